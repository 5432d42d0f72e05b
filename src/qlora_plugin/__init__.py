"""qlora-plugin: QLoRA for existing TRL and Axolotl pipelines, from one recipe.

``import qlora_plugin`` stays light (no torch, transformers or PEFT): the recipe
is imported when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qlora_plugin.errors import QLoRAConfigError
from qlora_plugin.hookspecs import hookimpl

if TYPE_CHECKING:
    from qlora_plugin.recipe import QLoRARecipe, qlora_recipe

__version__ = "0.1.0"
__all__ = ["QLoRAConfigError", "QLoRARecipe", "hookimpl", "qlora_recipe"]

_LAZY = {"QLoRARecipe": "qlora_plugin.recipe", "qlora_recipe": "qlora_plugin.recipe"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qlora_plugin' has no attribute {name!r}")
