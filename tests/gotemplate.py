"""Go's text/template, the part Ollama's chat templates use, to render a Modelfile's TEMPLATE in a test.

No Go toolchain or Ollama is needed. Covered, with Go's rules: text and ``{{ }}`` actions with
``{{-``/``-}}`` trimming (all whitespace up to the action), ``if``/``else if``/``else``/``end``,
``range PIPE`` and ``range $i, $x := PIPE`` (dot is the element), fields (``.A.B``, ``$.A``,
``$x.A``), string and integer literals, parentheses, and the functions ``eq``, ``ne``, ``and``, ``or``,
``not``, ``len``, ``index``, ``slice``. Truth is Go's: false, 0, "", nil and empty lists are false.
Anything else raises, so a template outside this subset fails the test rather than passing by accident.
"""

from __future__ import annotations

import re
from typing import Any

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(\()|(\))|(:=)|(,)|(-?\d+)|(\$?[\w]*(?:\.[\w]+)*\.?)|(\S))')


def render(template: str, data: dict[str, Any]) -> str:
    """``template`` executed with ``data`` as dot and ``$``."""
    nodes, rest = _parse(_lex(template), 0, ())
    assert rest == len(_lex(template)), "unbalanced {{ end }}"
    out: list[str] = []
    _run(nodes, data, {"$": data}, out)
    return "".join(out)


def _lex(template: str) -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    pos = 0
    for match in _ACTION.finditer(template):
        text = template[pos : match.start()]
        if match.group(1):
            text = text.rstrip(" \t\r\n")
        items.append(("text", text))
        items.append(("action", match.group(2).strip()))
        pos = match.end()
        if match.group(3):
            while pos < len(template) and template[pos] in " \t\r\n":
                pos += 1
    items.append(("text", template[pos:]))
    return items


def _parse(items: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list[Any], int]:
    nodes: list[Any] = []
    while i < len(items):
        kind, value = items[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
            continue
        word = value.split(None, 1)[0] if value else ""
        if word in stop or (word == "else" and "else" in stop):
            return nodes, i
        if word == "if":
            branches, i = _parse_if(items, i)
            nodes.append(("if", branches))
        elif word == "range":
            header = value[len("range") :].strip()
            variables: list[str] = []
            if ":=" in header:
                names, header = header.split(":=", 1)
                variables = [n.strip() for n in names.split(",")]
            body, i = _parse(items, i + 1, ("end",))
            nodes.append(("range", variables, header.strip(), body))
            i += 1
        else:
            nodes.append(("out", value))
            i += 1
    return nodes, i


def _parse_if(items: list[tuple[str, str]], i: int) -> tuple[list[tuple[str | None, list[Any]]], int]:
    condition = items[i][1][len("if") :].strip()
    branches: list[tuple[str | None, list[Any]]] = []
    while True:
        body, i = _parse(items, i + 1, ("end", "else"))
        branches.append((condition, body))
        action = items[i][1]
        if action == "end":
            return branches, i + 1
        if action.startswith("else if"):
            condition = action[len("else if") :].strip()
        else:
            body, i = _parse(items, i + 1, ("end",))
            branches.append((None, body))
            return branches, i + 1


def _run(nodes: list[Any], dot: Any, scope: dict[str, Any], out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "out":
            out.append(_text(_eval(node[1], dot, scope)))
        elif node[0] == "if":
            for condition, body in node[1]:
                if condition is None or _truth(_eval(condition, dot, scope)):
                    _run(body, dot, scope, out)
                    break
        elif node[0] == "range":
            _, variables, header, body = node
            for index, item in enumerate(_eval(header, dot, scope) or []):
                inner = dict(scope)
                if len(variables) == 2:
                    inner[variables[0]], inner[variables[1]] = index, item
                elif len(variables) == 1:
                    inner[variables[0]] = item
                _run(body, item, inner, out)


def _text(value: Any) -> str:
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _truth(value: Any) -> bool:
    return bool(value) if value is not None else False


def _eval(expression: str, dot: Any, scope: dict[str, Any]) -> Any:
    tokens = [m for m in _TOKEN.findall(expression) if any(m)]
    value, rest = _command(tokens, 0, dot, scope)
    if rest != len(tokens):
        raise ValueError(f"cannot evaluate {expression!r}")
    return value


def _command(tokens: list[Any], i: int, dot: Any, scope: dict[str, Any]) -> tuple[Any, int]:
    head, i = _operand(tokens, i, dot, scope)
    if not (isinstance(head, tuple) and head[0] == "func"):
        return head, i
    args = []
    while i < len(tokens) and not tokens[i][2]:
        value, i = _operand(tokens, i, dot, scope)
        args.append(value)
    return _call(head[1], args), i


def _operand(tokens: list[Any], i: int, dot: Any, scope: dict[str, Any]) -> tuple[Any, int]:
    string, open_, close, assign, comma, number, word, other = tokens[i]
    if string:
        return bytes(string[1:-1], "utf-8").decode("unicode_escape"), i + 1
    if number:
        return int(number), i + 1
    if open_:
        value, i = _command(tokens, i + 1, dot, scope)
        assert tokens[i][2], "missing )"
        return value, i + 1
    if word in ("eq", "ne", "and", "or", "not", "len", "index", "slice"):
        return ("func", word), i + 1
    if word == ".":
        return dot, i + 1
    if word.startswith("$"):
        name, _, path = word.partition(".")
        return _fields(scope[name], path), i + 1
    if word.startswith("."):
        return _fields(dot, word[1:]), i + 1
    raise ValueError(f"unsupported token {tokens[i]!r}")


def _fields(value: Any, path: str) -> Any:
    for name in filter(None, path.split(".")):
        value = value.get(name) if isinstance(value, dict) else getattr(value, name)
    return value


def _call(name: str, args: list[Any]) -> Any:
    if name == "eq":
        return any(args[0] == other for other in args[1:])
    if name == "ne":
        return args[0] != args[1]
    if name == "and":
        for arg in args:
            if not _truth(arg):
                return arg
        return args[-1]
    if name == "or":
        for arg in args:
            if _truth(arg):
                return arg
        return args[-1]
    if name == "not":
        return not _truth(args[0])
    if name == "len":
        return len(args[0])
    if name == "index":
        return args[0][args[1]]
    if name == "slice":
        return args[0][args[1] : args[2] if len(args) > 2 else None]
    raise ValueError(name)


def ollama_values(messages: list[dict[str, str]], default_system: str | None = None) -> dict[str, Any]:
    """What Ollama hands a chat template: ``.Messages`` (every message, a Modelfile SYSTEM first when the
    chat has no system message) and ``.System`` (the system messages' text, joined by blank lines)."""
    if default_system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": default_system}, *messages]
    collated: list[dict[str, str]] = []
    for message in messages:
        if collated and collated[-1]["Role"] == message["role"]:
            collated[-1]["Content"] += "\n\n" + message["content"]
        else:
            collated.append({"Role": message["role"], "Content": message["content"]})
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": system, "Messages": collated}
