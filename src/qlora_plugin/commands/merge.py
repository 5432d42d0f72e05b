"""``qlora merge``: an adapter merged into its dequantized base, saved as a plain model."""

from __future__ import annotations

import argparse
from typing import Any

from qlora_plugin.commands.options import add_trained_format_options, subcommand
from qlora_plugin.tools.console import console, print_json
from qlora_plugin.tools.merge import merge_adapter


def register(commands: Any) -> None:
    """Add the subcommand's parser to ``commands``."""
    parser = subcommand(
        commands,
        "merge",
        "merge a QLoRA adapter into its dequantized base and save a plain model",
        "qlora merge ./out/checkpoint-500 --out ./merged --dtype bf16",
    )
    parser.add_argument("adapter", metavar="ADAPTER_DIR", help="a directory with adapter_config.json")
    parser.add_argument("--out", required=True, help="the directory to write (must be new or empty)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="saved dtype (default bf16)")
    parser.add_argument("--base", default=None, help="the base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    add_trained_format_options(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON summary at the end")


def run(args: argparse.Namespace) -> int:
    """``qlora merge``."""
    summary = merge_adapter(
        args.adapter,
        args.out,
        args.dtype,
        args.base,
        args.force,
        show_progress=True,
        quant_type=args.quant_type,
        double_quant=args.double_quant,
        assume_default_recipe=args.assume_default_recipe,
    )
    if args.json:
        print_json(summary)
        return 0
    out = console()
    out.print(
        f"merged {summary['merged_layers']} LoRA layers into {summary['base']} "
        f"(dequantized from {summary['quantization']}) -> [bold]{summary['out']}[/bold] ({summary['dtype']})"
    )
    out.print(f"4-bit format from {summary['quantization_from']}")
    if summary["base_path"] and summary["base_path"] != summary["base"]:
        out.print(f"base {summary['base']} read from {summary['base_path']} (relative to the working directory)")
    if summary["quantization_note"]:
        out.print(f"[yellow]note:[/yellow] {summary['quantization_note']}")
    if summary["tokenizer_from"] is None:
        out.print("[yellow]note:[/yellow] no tokenizer found with the adapter or the base; none saved")
    out.print("load it with: AutoModelForCausalLM.from_pretrained(" + repr(summary["out"]) + ")")
    return 0
