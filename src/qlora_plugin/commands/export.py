"""``qlora export``: an adapter (or a merged model) as one GGUF file for llama.cpp and Ollama."""

from __future__ import annotations

import argparse
from typing import Any

from qlora_plugin.commands.options import add_trained_format_options, subcommand
from qlora_plugin.tools.console import console, gib, print_json
from qlora_plugin.tools.gguf_export import export_gguf


def register(commands: Any) -> None:
    """Add the subcommand's parser to ``commands``."""
    parser = subcommand(
        commands,
        "export",
        "merge an adapter into its dequantized base and write one GGUF file (llama.cpp, Ollama, LM Studio)",
        "qlora export ./out/adapter --format gguf --out model.gguf --type q8_0 --ollama",
    )
    parser.add_argument(
        "source", metavar="ADAPTER_OR_MERGED", help="an adapter directory, or a merged model folder (qlora merge)"
    )
    parser.add_argument("--format", required=True, choices=["gguf"], help="the file format (gguf)")
    parser.add_argument("--out", required=True, help="the file to write, ending in .gguf (must not exist)")
    parser.add_argument(
        "--type",
        dest="out_type",
        default="f16",
        choices=["f16", "bf16", "q8_0", "q4_0"],
        help="the weights' type (default f16; norms stay float32; q4_0 keeps the embedding and head in q8_0)",
    )
    parser.add_argument(
        "--ollama", action="store_true", help="also write a Modelfile beside the GGUF for `ollama create`"
    )
    parser.add_argument("--base", default=None, help="the base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out (and Modelfile)")
    add_trained_format_options(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON summary at the end")


def run(args: argparse.Namespace) -> int:
    """``qlora export``."""
    summary = export_gguf(
        args.source,
        args.out,
        args.out_type,
        base=args.base,
        force=args.force,
        ollama=args.ollama,
        quant_type=args.quant_type,
        double_quant=args.double_quant,
        assume_default_recipe=args.assume_default_recipe,
    )
    if args.json:
        print_json(summary)
        return 0
    out = console()
    merged = (
        f"merged {summary['merged_layers']} LoRA layers into {summary['base']}, " if summary["merged_layers"] else ""
    )
    types = ", ".join(f"{count} {name}" for name, count in summary["tensor_types"].items())
    out.print(
        f"{merged}wrote [bold]{summary['out']}[/bold] ({summary['family']} as llama.cpp's {summary['architecture']}, "
        f"{gib(summary['bytes'])} GiB; tensors: {types})"
    )
    tokenizer = summary["tokenizer"]
    out.print(
        f"tokenizer {tokenizer['model']}"
        + (f" ({tokenizer['pre']})" if tokenizer["pre"] else "")
        + f", {tokenizer['tokens']:,} tokens, special {tokenizer['special_ids']}; chat template "
        + ("included" if tokenizer["chat_template"] else "none")
    )
    if summary["modelfile"]:
        out.print(f"Modelfile ({summary['chat_format']} template): {summary['modelfile']}")
        out.print(f"run it: ollama create my-model -f {summary['modelfile']}")
    for note in summary["notes"]:
        out.print(f"[yellow]note:[/yellow] {note}")
    out.print(f"check it: qlora inspect {summary['out']}")
    return 0
