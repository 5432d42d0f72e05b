"""The ``qlora`` command."""

from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``qlora``."""
    from qlora_plugin import __version__

    parser = argparse.ArgumentParser(prog="qlora", description="QLoRA recipes for TRL and Axolotl.")
    parser.add_argument("--version", action="version", version=f"qlora-plugin {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    presets = commands.add_parser(
        "presets", help="list the named presets of every installed plugin",
        epilog="example: qlora presets --json",
    )
    presets.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def show_presets(as_json: bool) -> None:
    """Print every preset with the fields it sets."""
    from qlora_plugin.presets import all_presets

    presets = all_presets()
    if as_json:
        print(json.dumps(presets, indent=2, sort_keys=True))
        return
    for name, fields in sorted(presets.items()):
        settings = ", ".join(f"{key}={value}" for key, value in fields.items()) or "(the recipe defaults)"
        print(f"{name:<14} {settings}")


def main(argv: list[str] | None = None) -> int:
    """Run ``qlora``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "presets":
        show_presets(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
