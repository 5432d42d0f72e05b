"""``qlora presets``: the named presets of every installed plugin."""

from __future__ import annotations

import argparse
from typing import Any

from qlora_plugin.commands.options import subcommand
from qlora_plugin.core.plugins import all_presets
from qlora_plugin.tools.console import print_json


def register(commands: Any) -> None:
    """Add the subcommand's parser to ``commands``."""
    parser = subcommand(commands, "presets", "list the named presets of every installed plugin", "qlora presets --json")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    """Print every preset with the fields it sets."""
    presets = all_presets()
    if args.json:
        print_json(dict(sorted(presets.items())))
        return 0
    for name, fields in sorted(presets.items()):
        settings = ", ".join(f"{key}={value}" for key, value in fields.items()) or "(the recipe defaults)"
        print(f"{name:<14} {settings}")
    return 0
