"""An Ollama ``Modelfile`` for an exported GGUF: ``FROM``, the chat template in Ollama's syntax, stop tokens.

Ollama renders prompts with Go templates, not the Jinja of ``tokenizer_config.json``, and a
wrong template is the silent failure users meet most: the model answers, badly. So the Jinja
template is not translated; it is recognised. Each chat format here (ChatML, Llama 3, Gemma)
has a Go template written for it and a Python rendering of what that Go template produces;
the tokenizer's own template is rendered on probe conversations and must give exactly the same
text for the format to be chosen (less the BOS token where llama.cpp adds it itself). Default
system prompts and fixed system prefixes (Llama 3.1's knowledge date) are carried over. A
template that matches no format is refused before anything is merged.

Ollama hands the template ``.Messages`` (every message, system ones included) and ``.System``
(the system messages' text); a ``SYSTEM`` line in the Modelfile arrives as a system message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qlora_plugin.core.errors import QLoRAConfigError

Message = dict[str, str]
PROBES: tuple[tuple[Message, ...], ...] = (
    ({"role": "user", "content": "Hi there"},),
    ({"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi there"}),
    (
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a colour."},
    ),
    (
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a colour."},
    ),
)
FORMATS = "ChatML (SmolLM2, Qwen2/3), Llama 3, Gemma"


@dataclass(frozen=True)
class ChatFormat:
    """A recognised chat format: its name, the Go template for Ollama, and the tokens that end a reply."""

    name: str
    template: str
    stops: tuple[str, ...]


@dataclass(frozen=True)
class _Shape:
    """How one family lays out messages; ``render`` mirrors ``go`` in Python (used to recognise the family)."""

    name: str
    head: Callable[[str], str]  # role -> the text before a message's content
    tail: str  # the text after each message's content
    prompt: str  # the generation prompt after the last message
    stops: tuple[str, ...]


SHAPES = (
    _Shape("ChatML", lambda role: f"<|im_start|>{role}\n", "<|im_end|>\n", "<|im_start|>assistant\n", ("<|im_end|>",)),
    _Shape(
        "Llama 3",
        lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n",
        "<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|eot_id|>", "<|start_header_id|>"),
    ),
)


def chat_format(tokenizer: Any) -> ChatFormat:
    """The chat format of ``tokenizer``'s template, or a one-line error naming the formats recognised."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise QLoRAConfigError(
            "chat_template",
            None,
            "the tokenizer has none, so Ollama would not know how to lay out a chat",
            "export without --ollama (or add the template the model was trained with to tokenizer_config.json)",
        )
    raw = [_render_hf(tokenizer, probe) for probe in PROBES]
    bos = str(getattr(tokenizer, "bos_token", None) or "")
    # the template writes the BOS token where it uses the variable (SmolLM2's BOS is also its turn marker)
    writes_bos = bool(bos) and "bos_token" in str(template) and all(t is None or t.startswith(bos) for t in raw)
    rendered = [text[len(bos) :] if writes_bos and text is not None else text for text in raw]
    # llama.cpp adds the BOS token itself where the tokenizer does; elsewhere the template has to write it
    lead = _go_text(bos) if writes_bos and not _adds_bos(tokenizer) else ""
    for shape in SHAPES:
        found = _as_shape(shape, rendered)
        if found is not None:
            return ChatFormat(shape.name, lead + found, _stops(shape.stops, tokenizer))
    found = _as_gemma(rendered)
    if found is not None:
        return ChatFormat("Gemma", lead + found, _stops(("<end_of_turn>",), tokenizer))
    raise QLoRAConfigError(
        "chat_template",
        _first_line(template),
        f"is not a chat format written for Ollama here ({FORMATS})",
        "export without --ollama and write the Modelfile's TEMPLATE by hand (ollama.com/docs: template)",
    )


def modelfile(gguf_name: str, fmt: ChatFormat, source: str) -> str:
    """The Modelfile text: ``FROM ./<gguf_name>``, the template and one stop line per token."""
    lines = [
        f"# Written by `qlora export` from {source} ({fmt.name} chat format)",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{fmt.template}"""',
        *(f'PARAMETER stop "{stop}"' for stop in fmt.stops),
    ]
    return "\n".join(lines) + "\n"


def _render_hf(tokenizer: Any, messages: tuple[Message, ...]) -> str | None:
    try:
        return str(tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True))
    except Exception:  # a template that refuses a conversation (Gemma 2 has no system role) renders nothing
        return None


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("x")["input_ids"][:1] == [bos]


def _as_shape(shape: _Shape, rendered: list[str | None]) -> str | None:
    """The Go template for ``shape`` if it reproduces every rendering, with the default system block and
    system prefix the tokenizer's template adds."""
    plain, with_system = rendered[0], rendered[1]
    if plain is None or with_system is None:
        return None
    system_head = shape.head("system")
    default = ""
    if plain.startswith(system_head):
        default, _, _ = plain[len(system_head) :].partition(shape.tail)
        default = system_head + default + shape.tail
    if not with_system.startswith(system_head):
        return None
    content = with_system[len(system_head) :].partition(shape.tail)[0]
    if not content.endswith(PROBES[1][0]["content"]):
        return None
    prefix = content[: -len(PROBES[1][0]["content"])]

    def render(messages: tuple[Message, ...]) -> str:
        text = default if not any(m["role"] == "system" for m in messages) else ""
        for m in messages:
            text += shape.head(m["role"]) + (prefix if m["role"] == "system" else "") + m["content"] + shape.tail
        return text + shape.prompt

    if any(text != render(probe) for text, probe in zip(rendered, PROBES, strict=True)):
        return None
    body = (
        "{{ range .Messages }}"
        + _go_text(shape.head("\x00")).replace("\x00", "{{ .Role }}")
        + (f'{{{{ if eq .Role "system" }}}}{_go_text(prefix)}{{{{ end }}}}' if prefix else "")
        + "{{ .Content }}"
        + _go_text(shape.tail)
        + "{{ end }}"
        + _go_text(shape.prompt)
    )
    return (f"{{{{ if not .System }}}}{_go_text(default)}{{{{ end }}}}" if default else "") + body


def _as_gemma(rendered: list[str | None]) -> str | None:
    """Gemma's turns (``model`` for the assistant), the system text leading the first user turn; Gemma 2's
    template has no system role at all."""
    has_system = rendered[1] is not None

    def render(messages: tuple[Message, ...]) -> str | None:
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        if system and not has_system:
            return None
        text = ""
        for i, m in enumerate(messages):
            if m["role"] == "user":
                lead = system + "\n\n" if system and i == 1 else ""
                text += f"<start_of_turn>user\n{lead}{m['content']}<end_of_turn>\n"
            elif m["role"] == "assistant":
                text += f"<start_of_turn>model\n{m['content']}<end_of_turn>\n"
        return text + "<start_of_turn>model\n"

    if any(text != render(probe) for text, probe in zip(rendered, PROBES, strict=True)):
        return None
    system = "{{ if and $.System (eq $i 1) }}{{ $.System }}\n\n{{ end }}" if has_system else ""
    return (
        "{{ range $i, $m := .Messages }}"
        '{{ if eq $m.Role "user" }}<start_of_turn>user\n' + system + "{{ $m.Content }}<end_of_turn>\n"
        '{{ else if eq $m.Role "assistant" }}<start_of_turn>model\n{{ $m.Content }}<end_of_turn>\n'
        "{{ end }}{{ end }}<start_of_turn>model\n"
    )


def _go_text(text: str) -> str:
    """``text`` as literal template text (``{{`` would open an action)."""
    return text.replace("{{", '{{ "{{" }}')


def _stops(stops: tuple[str, ...], tokenizer: Any) -> tuple[str, ...]:
    eos = getattr(tokenizer, "eos_token", None)
    return tuple(dict.fromkeys([*stops, *([eos] if eos else [])]))


def _first_line(text: Any) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line[:60] + ("..." if len(line) > 60 else "")
