"""Readying a 4-bit base for training: the recipe's one switch between paths.

``fast_path=True`` (default): the base keeps its compute dtype (bf16 on
recent GPUs) and the adapters run in it too. ``fast_path=False``: PEFT's stock
``prepare_model_for_kbit_training``, which casts every non-quantized parameter
(embeddings, norms, output head) to fp32 and leaves the adapters in fp32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from peft import prepare_model_for_kbit_training

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from qlora_plugin.core.recipe import QLoRARecipe


def prepare_for_training(model: PreTrainedModel, recipe: QLoRARecipe) -> PreTrainedModel:
    """Freeze the base and set up checkpointing, on the path the recipe chose."""
    checkpointing_kwargs = {"use_reentrant": False}
    if not recipe.fast_path:
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=bool(recipe.gradient_checkpointing),
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
    model.requires_grad_(False)
    keep_in_compute_dtype(model, recipe.resolved_compute_dtype(model.device.type))
    if recipe.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
        model.enable_input_require_grads()
    return model


def keep_in_compute_dtype(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Cast every floating, non-quantized parameter to ``dtype`` (buffers such as RoPE tables stay).

    Undoes fp32 upcasts a trainer's own preparation may have made (Axolotl
    runs PEFT's ``prepare_model_for_kbit_training`` before the plugin sees the
    model); a no-op on a model loaded in ``dtype``.
    """
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype and type(param).__name__ != "Params4bit":
            param.data = param.data.to(dtype)
