"""qlora-plugin: QLoRA for existing TRL and Axolotl pipelines, from one recipe.

``import qlora_plugin`` stays light (no torch, transformers or PEFT): the recipe is
imported when first used. This module is the public facade, above every layer
(``core`` < ``build`` < ``fastpath`` < ``integrations`` < ``tools`` < ``commands``): it fills
the core's seams (:mod:`qlora_plugin.core.seams`) with functions that import the layer
they belong to only when called (each of those layers imports torch, transformers or TRL).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qlora_plugin.core import seams
from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.hookspecs import hookimpl

if TYPE_CHECKING:
    import os

    import torch

    from qlora_plugin.build.context import RunContext
    from qlora_plugin.core.recipe import QLoRARecipe, qlora_recipe

__version__ = "0.1.0"
__all__ = ["QLoRAConfigError", "QLoRARecipe", "hookimpl", "qlora_recipe"]

_LAZY = {"QLoRARecipe": "qlora_plugin.core.recipe", "qlora_recipe": "qlora_plugin.core.recipe"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qlora_plugin' has no attribute {name!r}")


def _sft_config(recipe: QLoRARecipe, /, **overrides: Any) -> Any:
    from qlora_plugin.integrations.trl import sft_config

    return sft_config(recipe, **overrides)


def _training_args(recipe: QLoRARecipe, device: str | None = None) -> dict[str, Any]:
    from qlora_plugin.integrations.transformers import training_args

    return training_args(recipe, device)


def _optimizer_cls_and_kwargs(recipe: QLoRARecipe, args: Any = None) -> Any:
    from qlora_plugin.build.context import context_of_args
    from qlora_plugin.build.lora_layers import context_for
    from qlora_plugin.fastpath.optimizer import optimizer_cls_and_kwargs

    context = context_of_args(args) or context_for(recipe)  # the run of sft_config's config, where it is one
    return optimizer_cls_and_kwargs(context, args, recipe.learning_rate)


def _callbacks(recipe: QLoRARecipe) -> list[Any]:
    from qlora_plugin.integrations.checkpoints import recipe_callbacks

    return recipe_callbacks(recipe)


def _lora_layer_factory(recipe: QLoRARecipe) -> None:
    from qlora_plugin.build.lora_layers import register_factory

    register_factory(recipe)


def _storage_dtype(recipe: QLoRARecipe, compute_dtype: torch.dtype) -> torch.dtype:
    from qlora_plugin.build.lora_layers import context_for
    from qlora_plugin.build.quantization import storage_dtype

    return storage_dtype(recipe, compute_dtype, context_for(recipe))


def _meta_model(path: str | os.PathLike[str]) -> Any:
    from qlora_plugin.build.models import meta_model

    return meta_model(path)


def _load_model(path: str | os.PathLike[str], recipe: QLoRARecipe, **kwargs: Any) -> Any:
    from qlora_plugin.build.models import load_quantized

    return load_quantized(path, recipe, **kwargs)


def _lora_layer_built(layer: Any, recipe: QLoRARecipe, context: RunContext) -> None:
    from qlora_plugin.fastpath.activation import arm_for_layer
    from qlora_plugin.integrations import moe_check
    from qlora_plugin.integrations.transformers import offer_fused_optimizer

    moe_check.arm(recipe)  # MoE experts: in 4 bits and adapted as asked, before the first step
    arm_for_layer(layer, context)
    if context.fast_path_on() and recipe.optimizer == "paged_adamw_32bit":
        offer_fused_optimizer()


seams.provide("sft_config", _sft_config)
seams.provide("training_args", _training_args)
seams.provide("optimizer_cls_and_kwargs", _optimizer_cls_and_kwargs)
seams.provide("callbacks", _callbacks)
seams.provide("lora_layer_factory", _lora_layer_factory)
seams.provide("storage_dtype", _storage_dtype)
seams.provide("meta_model", _meta_model)
seams.provide("load_model", _load_model)
seams.provide("lora_layer_built", _lora_layer_built)
