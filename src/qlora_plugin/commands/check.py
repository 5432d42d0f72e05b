"""``qlora check``: an Axolotl config checked before training (plugin line, section, data)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qlora_plugin.commands.options import subcommand
from qlora_plugin.tools.console import print_json
from qlora_plugin.tools.preflight import check_config


def register(commands: Any) -> None:
    """Add the subcommand's parser to ``commands``."""
    parser = subcommand(
        commands,
        "check",
        "check an Axolotl config before training: the plugin line, the qlora section, the data",
        "qlora check configs/qlora.yml",
    )
    parser.add_argument("config", metavar="CONFIG", help="an Axolotl YAML with a qlora: section")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")


def run(args: argparse.Namespace) -> int:
    """``qlora check``."""
    result = check_config(args.config)
    if args.json:
        print_json(result.to_dict())
        return 0 if result.ok else 2
    for line in result.checked:
        print(f"ok: {line}")
    for note in result.notes:
        print(f"note: {note}")
    for warning in result.warnings:
        print(f"warning: {warning}")
    for error in result.errors:
        print(f"qlora check: error: {error}", file=sys.stderr)
    if result.ok:
        print(f"{args.config}: ready to train")
        return 0
    problems = f"{len(result.errors)} problem{'s' if len(result.errors) > 1 else ''}"
    print(f"qlora check: {args.config}: {problems}; fix them, then run `qlora check` again", file=sys.stderr)
    return 2
