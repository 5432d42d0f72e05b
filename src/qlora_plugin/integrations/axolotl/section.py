"""The ``qlora:`` section of an Axolotl config, read as a recipe without importing Axolotl or PEFT.

Shared by the Axolotl plugin (which expands the section into Axolotl's keys) and
``qlora check`` (which runs where Axolotl is not loaded). Errors name the field
as the YAML spells it: ``qlora.<field>``.
"""

from __future__ import annotations

from typing import Any

from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.fields import RecipeSpec, recipe_spec

SECTION = "qlora"
PLUGIN = "qlora_plugin.axolotl.QLoRAPlugin"
PLUGIN_NAMES = (PLUGIN, "qlora_plugin.integrations.axolotl.plugin.QLoRAPlugin")  # how a `plugins:` line may name it


def spec_from_section(section: Any) -> RecipeSpec:
    """The recipe a ``qlora:`` section describes, checked; errors name ``qlora.<key>``."""
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise QLoRAConfigError(
            SECTION, section, "must be a mapping of recipe fields", "write e.g. `qlora: {preset: paper, r: 32}`"
        )
    fields = dict(section)
    preset = fields.pop("preset", "default")
    try:
        return recipe_spec(preset, **fields)
    except QLoRAConfigError as error:
        raise in_section(error) from error


def in_section(error: QLoRAConfigError) -> QLoRAConfigError:
    """The same error, with the field named as the YAML spells it: ``qlora.<field>``."""
    return QLoRAConfigError(f"{SECTION}.{error.field}", error.value, error.problem, error.fix)


def names_the_plugin(plugins: Any) -> bool:
    """True if an Axolotl ``plugins:`` value loads the QLoRA plugin."""
    return isinstance(plugins, list) and any(name in PLUGIN_NAMES for name in plugins)


def misplaced_section(config: Any) -> QLoRAConfigError | None:
    """The error for a ``qlora:`` section where Axolotl never reads it, or None.

    Axolotl reads the section at the top of the config only: one indented under another key
    (a dataset, ``lora:``) or nested in itself (``qlora: {qlora: {...}}``) is ignored, silently.
    """
    if not isinstance(config, dict):
        return None
    section = config.get(SECTION)
    if isinstance(section, dict) and SECTION in section:
        return QLoRAConfigError(
            f"{SECTION}.{SECTION}",
            section[SECTION],
            "is the section nested in itself, one level too deep: its fields would be read as one unknown field",
            f"move its fields up one level: `{SECTION}: {{r: 16, ...}}`",
        )
    for where, value in _nested(config, ""):
        return QLoRAConfigError(
            f"{where}.{SECTION}",
            value,
            f"is one level too deep: Axolotl reads the {SECTION}: section only at the top of the config, so this one "
            "is ignored",
            f"move it to the top level (no indentation), as `{SECTION}:` beside base_model",
        )
    return None


def _nested(value: Any, where: str) -> Any:
    """(path, section) for each ``qlora`` key below the top level of ``value``."""
    if isinstance(value, dict):
        for key, inner in value.items():
            path = f"{where}.{key}" if where else str(key)
            if where and key == SECTION:
                yield where, inner
            elif not (not where and key == SECTION):
                yield from _nested(inner, path)
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from _nested(inner, f"{where}[{index}]")


# The Axolotl keys the plugin reads, what each must be, and an example (Axolotl validates them only later,
# after the plugin has used them).
AXOLOTL_KEYS: dict[str, tuple[tuple[type, ...], str, str]] = {
    "base_model": ((str,), "a model directory or hub id", "./models/my-model"),
    "tokenizer_config": ((str,), "a tokenizer directory or hub id", "./models/my-model"),
    "sequence_len": ((int,), "a positive whole number of tokens", "2048"),
    "seed": ((int,), "a whole number", "42"),
    "output_dir": ((str,), "a directory path", "./outputs/run"),
    "resume_from_checkpoint": ((str,), "a checkpoint directory", "./outputs/run/checkpoint-100"),
    "lora_target_modules": ((str, list), "a module name or a list of them", "[q_proj, v_proj]"),
    "fsdp_config": ((dict,), "a mapping of FSDP settings", "{fsdp_version: 2}"),
    "deepspeed": ((str, dict), "a DeepSpeed JSON file or a mapping", "deepspeed_configs/zero3.json"),
}


def check_axolotl_keys(config: Any) -> QLoRAConfigError | None:
    """The error for the first Axolotl key the plugin reads that holds the wrong kind of value, or None."""
    if not isinstance(config, dict):
        return None
    for key, (kinds, what, example) in AXOLOTL_KEYS.items():
        value = config.get(key)
        if value is None:
            continue
        wrong = isinstance(value, bool) or not isinstance(value, kinds)
        if not wrong and isinstance(value, str):
            wrong = not value.strip()
        if not wrong and key == "sequence_len":
            wrong = isinstance(value, int) and value < 1
        if not wrong and isinstance(value, list):
            wrong = not all(isinstance(item, str) and item.strip() for item in value)
        if wrong:
            return QLoRAConfigError(
                key, value, f"must be {what}, not {_kind(value)}", f"write e.g. `{key}: {example}`, or leave it out"
            )
    return None


def _kind(value: Any) -> str:
    if isinstance(value, str) and not value.strip():
        return "empty text"
    if isinstance(value, int) and not isinstance(value, bool) and value < 1:
        return str(value)
    if isinstance(value, list):
        return "a list with something other than names in it"
    return type(value).__name__
