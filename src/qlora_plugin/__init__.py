"""qlora-plugin: QLoRA for existing TRL and Axolotl pipelines, from one recipe.

``import qlora_plugin`` stays light (no torch, transformers or PEFT): the recipe is
imported when first used. This module is the public facade, above every layer
(``core`` < ``build`` < ``fastpath`` < ``integrations`` < ``tools`` < ``commands``): it fills the
core's seams (:mod:`qlora_plugin.core.seams`) with functions that import the layer
they belong to only when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qlora_plugin.core import seams
from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.hookspecs import hookimpl

if TYPE_CHECKING:
    from qlora_plugin.core.recipe import QLoRARecipe, qlora_recipe

__version__ = "0.1.0"
__all__ = ["QLoRAConfigError", "QLoRARecipe", "hookimpl", "qlora_recipe"]

_LAZY = {"QLoRARecipe": "qlora_plugin.core.recipe", "qlora_recipe": "qlora_plugin.core.recipe"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qlora_plugin' has no attribute {name!r}")


def _sft_config(recipe: Any, /, **overrides: Any) -> Any:
    from qlora_plugin.integrations.trl import sft_config

    return sft_config(recipe, **overrides)


def _training_args(recipe: Any, device: str | None = None) -> dict[str, Any]:
    from qlora_plugin.integrations.transformers import training_args

    return training_args(recipe, device)


def _optimizer_cls_and_kwargs(recipe: Any, args: Any = None) -> Any:
    from qlora_plugin.fastpath.activation import optimizer_cls_and_kwargs

    return optimizer_cls_and_kwargs(recipe, args)


def _callbacks(recipe: Any) -> list[Any]:
    from qlora_plugin.integrations.checkpoints import recipe_callbacks

    return recipe_callbacks(recipe)


def _lora_layer_built(layer: Any, recipe: Any) -> None:
    from qlora_plugin.fastpath.activation import arm_for_layer, wants_fast_path
    from qlora_plugin.integrations import moe_check
    from qlora_plugin.integrations.transformers import offer_fused_optimizer

    moe_check.arm(recipe)  # MoE experts: in 4 bits and adapted as asked, before the first step
    arm_for_layer(layer, recipe)
    if wants_fast_path(recipe) and recipe.optimizer == "paged_adamw_32bit":
        offer_fused_optimizer()


def _expert_lora_layers() -> dict[type, Any]:
    from torch import nn

    from qlora_plugin.build.moe_experts import make_expert_lora_layer

    return {nn.Module: make_expert_lora_layer}  # last in the mapping: any module PEFT targets a parameter of


def _quantize_experts(model: Any, recipe: Any) -> int:
    from qlora_plugin.build.moe_experts import quantize_experts

    return quantize_experts(model, recipe)


seams.provide("sft_config", _sft_config)
seams.provide("training_args", _training_args)
seams.provide("optimizer_cls_and_kwargs", _optimizer_cls_and_kwargs)
seams.provide("callbacks", _callbacks)
seams.provide("lora_layer_built", _lora_layer_built)
seams.provide("expert_lora_layers", _expert_lora_layers)
seams.provide("quantize_experts", _quantize_experts)
