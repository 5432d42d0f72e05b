"""``qlora inspect model.gguf``: what a GGUF file holds, read back from the file."""

from __future__ import annotations

from qlora_plugin.tools.console import console, count, gib, print_json
from qlora_plugin.tools.gguf_read import read_gguf


def show(path: str, as_json: bool) -> int:
    """Print the summary of the GGUF file at ``path`` (or its JSON)."""
    report = read_gguf(path)
    if as_json:
        print_json(report)
        return 0
    out = console()
    hp = report["hyper_parameters"]
    out.print(
        f"[bold]{report['file']}[/bold]  GGUF, llama.cpp architecture {report['architecture']}, "
        f"{hp.get('block_count', '?')} layers, hidden {hp.get('embedding_length', '?')}, "
        f"context {hp.get('context_length', '?')}; {count(report['parameters'])} parameters, {gib(report['bytes'])} GiB"
    )
    types = ", ".join(f"{n} {name}" for name, n in report["tensor_types"].items())
    out.print(f"tensors  {report['tensors']}: {types}")
    tok = report["tokenizer"]
    special = ", ".join(f"{name} {s['id']} {s['text']!r}" for name, s in tok["special"].items())
    pre = f" ({tok['pre']})" if tok["pre"] and tok["pre"] != "default" else ""
    out.print(
        f"tokenizer  {tok['model']}{pre}, {tok['tokens']:,} tokens, {tok['merges']:,} merges; {special}; "
        f"adds BOS: {tok['add_bos']}",
        markup=False,
    )
    template = report["chat_template"]
    if template:
        first = str(template).strip().splitlines()[0]
        out.print(f"chat template  {len(str(template)):,} characters: {first[:80]}", markup=False)
    else:
        out.print("chat template  none")
    return 0
