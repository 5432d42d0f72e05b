"""The recipe options the ``qlora`` subcommands share: ``--preset`` and ``--set FIELD=VALUE``.

A value is read as YAML, like the same field in a ``qlora:`` section
(``--set r=32``, ``--set fast_path=false``, ``--set target_modules=[q_proj,v_proj]``),
and checked by the same rules (:mod:`qlora_plugin.core.fields`).
"""

from __future__ import annotations

import argparse
from typing import Any

from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.fields import RecipeSpec, recipe_spec


def add_recipe_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--preset`` and ``--set`` to ``parser``."""
    parser.add_argument("--preset", default="default", help="the preset the recipe starts from (see `qlora presets`)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override one recipe field, e.g. --set r=32 --set fast_path=false (repeatable)",
    )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["r=32", "fast_path=false"]`` -> ``{"r": 32, "fast_path": False}``; values read as YAML."""
    import yaml

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise QLoRAConfigError("--set", item, "is not FIELD=VALUE", "write e.g. --set r=32")
        try:
            overrides[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as error:
            raise QLoRAConfigError(
                key.strip(),
                value,
                "cannot be read as a value",
                f"quote it or fix its syntax, e.g. --set {key.strip()}=[q_proj,v_proj]",
            ) from error
    return overrides


def recipe_from_args(args: argparse.Namespace) -> RecipeSpec:
    """The recipe ``--preset`` and ``--set`` describe, checked (no PEFT import)."""
    return recipe_spec(args.preset, **parse_overrides(args.overrides))


def subcommand(commands: Any, name: str, help: str, example: str) -> argparse.ArgumentParser:
    """A subcommand's parser, with its description, an example and ``--verbose``."""
    parser = commands.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the warnings of torch, transformers, bitsandbytes and other libraries",
    )
    return parser
