"""The ``qlora:`` section of an Axolotl config, read as a recipe without importing Axolotl or PEFT.

Shared by the Axolotl plugin (which expands the section into Axolotl's keys) and
``qlora check`` (which runs where Axolotl is not loaded). Errors name the field
as the YAML spells it: ``qlora.<field>``.
"""

from __future__ import annotations

from typing import Any

from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.fields import RecipeSpec

SECTION = "qlora"
PLUGIN = "qlora_plugin.axolotl.QLoRAPlugin"
PLUGIN_NAMES = (PLUGIN, "qlora_plugin.integrations.axolotl.plugin.QLoRAPlugin")  # how a `plugins:` line may name it


def spec_from_section(section: Any) -> RecipeSpec:
    """The recipe a ``qlora:`` section describes, checked; errors name ``qlora.<key>``."""
    from qlora_plugin.core.fields import recipe_spec

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
