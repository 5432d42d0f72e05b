"""``qlora convert-finlora``: a FinLoRA configs entry as an Axolotl YAML."""

from __future__ import annotations

import argparse
import os
from typing import Any

from qlora_plugin.commands.options import subcommand
from qlora_plugin.tools.console import console, print_json
from qlora_plugin.tools.finlora import convert


def register(commands: Any) -> None:
    """Add the subcommand's parser to ``commands``."""
    parser = subcommand(
        commands,
        "convert-finlora",
        "turn a FinLoRA finetune_configs.json entry into an Axolotl YAML",
        "qlora convert-finlora lora/finetune_configs.json sentiment_llama_3_1_8b_4bits_r4 --out configs/sentiment.yml",
    )
    parser.add_argument("configs", metavar="CONFIGS_JSON", help="FinLoRA's finetune_configs.json (or one like it)")
    parser.add_argument("name", metavar="NAME", help="the entry to convert")
    parser.add_argument("--out", default=None, help="the YAML to write (default configs/NAME.yml)")
    parser.add_argument("--preset", default=None, help="add `preset: NAME` to the qlora section")
    parser.add_argument("--base-model", default=None, help="use this model instead of the entry's (e.g. a local copy)")
    parser.add_argument(
        "--force-4bit",
        action="store_true",
        help="convert an 8- or 16-bit entry as a 4-bit QLoRA run instead of refusing it",
    )
    parser.add_argument(
        "--dataset-type",
        default="finlora",
        help="Axolotl dataset type; 'finlora' maps its context/target fields (default)",
    )
    parser.add_argument("--sequence-len", type=int, default=4096, help="Axolotl sequence_len (default 4096)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    parser.add_argument("--json", action="store_true", help="print the config as JSON too")


def run(args: argparse.Namespace) -> int:
    """``qlora convert-finlora``."""
    path, config, notes = convert(
        args.configs,
        args.name,
        args.out,
        force=args.force,
        preset=args.preset,
        base_model=args.base_model,
        dataset_type=args.dataset_type,
        sequence_len=args.sequence_len,
        force_4bit=args.force_4bit,
    )
    if args.json:
        print_json({"out": os.fspath(path), "config": config, "notes": notes})
        return 0
    out = console()
    section = ", ".join(f"{key}={value}" for key, value in config["qlora"].items())
    out.print(f"wrote [bold]{path}[/bold]: {config['base_model']}, qlora: {section}")
    for note in notes:
        out.print(f"[yellow]note:[/yellow] {note}")
    out.print(f"train with: axolotl train {path}")
    return 0
