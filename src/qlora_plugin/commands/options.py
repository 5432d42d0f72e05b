"""The recipe options the ``qlora`` subcommands share: ``--preset`` and ``--set FIELD=VALUE``.

A value is read as YAML, like the same field in a ``qlora:`` section
(``--set r=32``, ``--set fast_path=false``, ``--set target_modules=[q_proj,v_proj]``),
and checked by the same rules (:mod:`qlora_plugin.core.fields`).
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.fields import RecipeSpec, recipe_spec
from qlora_plugin.integrations.axolotl.section import spec_from_section


def add_recipe_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--preset`` and ``--set`` to ``parser``."""
    parser.add_argument(
        "--preset",
        default=None,
        help="the preset the recipe starts from (see `qlora presets`); default: the config's, else 'default'",
    )
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


def recipe_from_args(args: argparse.Namespace, section: dict[str, Any] | None = None) -> RecipeSpec:
    """The recipe ``--preset`` and ``--set`` describe, checked (no PEFT import).

    ``section`` is the ``qlora:`` section of an Axolotl config given as the model: the recipe
    starts from it (checked as the plugin checks it), and ``--preset`` / ``--set`` change it.
    """
    overrides = parse_overrides(args.overrides)
    if "preset" in overrides:
        raise QLoRAConfigError(
            "--set preset",
            overrides["preset"],
            "the preset is chosen with --preset, not --set (--set overrides the preset's fields)",
            f"write --preset {overrides['preset']}",
        )
    fields: dict[str, Any] = {}
    preset = "default"
    if section is not None:
        spec_from_section(section)  # errors name qlora.<field>
        fields = dict(section)
        preset = fields.pop("preset", preset)
    return recipe_spec(args.preset or preset, **{**fields, **overrides})


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


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line with the fix, like every other bad input (exit 2).

    argparse's own report is the usage block and a line without a fix. Subcommand parsers made by
    ``add_subparsers`` are of the parent's class, so every ``qlora`` subcommand answers the same way.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}. Fix: {argparse_fix(message, self.prog)}\n")


def argparse_fix(message: str, prog: str) -> str:
    """The fix for one of argparse's error messages."""
    help_hint = f"`{prog} --help` lists the options, with an example"
    if message.startswith("the following arguments are required"):
        return f"add them; {help_hint}"
    if message.startswith("unrecognized arguments"):
        return f"remove them or correct their spelling; {help_hint}"
    if "invalid int value" in message:
        return f"pass a whole number there; {help_hint}"
    if "invalid choice" in message:
        return "use one of the choices listed"
    if "expected one argument" in message:
        return f"give the option a value right after it; {help_hint}"
    if "ignored explicit argument" in message:
        return f"this switch takes no value: drop the '=...'; {help_hint}"
    return help_hint


def add_trained_format_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--quant-type``, ``--[no-]double-quant`` and ``--assume-default-recipe`` (merge, export)."""
    trained = parser.add_argument_group(
        "the 4-bit base the adapter was trained against (read from qlora_recipe.json, qlora_expanded.yml or the run's "
        "config.json; needed only where none of them says)"
    )
    trained.add_argument("--quant-type", choices=["nf4", "fp4"], default=None, help="the 4-bit data type of training")
    trained.add_argument(
        "--double-quant",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether training quantized the block constants too",
    )
    trained.add_argument(
        "--assume-default-recipe",
        action="store_true",
        help="no record says: take the recipe's defaults (NF4 with double quant)",
    )
