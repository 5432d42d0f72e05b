"""4-bit layers of the frozen base: their storage dtype for the run, 16-bit layers quantized, the NF4 layout kept."""

from __future__ import annotations

import logging
from typing import Any

import bitsandbytes as bnb
import torch
from bitsandbytes import functional as bnb_functional
from torch import nn
from transformers.pytorch_utils import Conv1D

from qlora_plugin.build.context import RunContext, make_context
from qlora_plugin.build.distributed import FSDP_NAME
from qlora_plugin.build.fsdp_bytes import guard_float_storage
from qlora_plugin.core.device import torch_dtype
from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.fields import quantizes_targets_itself
from qlora_plugin.core.hookspecs import RecipeFields
from qlora_plugin.core.patches import allowed
from qlora_plugin.core.plugins import quantization_config as plugins_quantization_config


def storage_dtype(recipe: RecipeFields, compute_dtype: torch.dtype, context: RunContext) -> torch.dtype:
    """The dtype the packed 4-bit weights are stored in (``quant_storage``) in the run of ``context``.

    ``"auto"``: uint8, or where FSDP or DeepSpeed ZeRO-3 shards the model (``context.sharding``)
    the compute dtype. Under FSDP that is the storage the FSDP QLoRA path of accelerate and
    Axolotl is built for (FSDP1 cannot flatten integer tensors), and FSDP2 is made to all-gather
    it as bytes (:func:`qlora_plugin.build.fsdp_bytes.guard_float_storage`); under ZeRO-3 the
    storage of PEFT's "DeepSpeed ZeRO-3 + QLoRA" guide, one dtype for every parameter ZeRO-3
    partitions. There an explicit storage dtype other than the compute dtype is an error.
    """
    engine = context.sharding
    compute = str(compute_dtype).removeprefix("torch.")
    if engine is None:
        return torch_dtype("uint8" if recipe.quant_storage == "auto" else recipe.quant_storage)
    if engine == FSDP_NAME:
        why = "the storage FSDP's QLoRA path is built for; FSDP1 cannot shard uint8"
        failure = (
            "the storage the FSDP QLoRA path of accelerate and Axolotl is built for (FSDP1 fails on uint8: "
            "'Cannot flatten integer dtype tensors')"
        )
    else:
        why = "the storage of PEFT's ZeRO-3 QLoRA guide: one dtype for every parameter ZeRO-3 partitions"
        failure = "the storage of PEFT's DeepSpeed ZeRO-3 + QLoRA guide, one dtype for every partitioned parameter"
    if recipe.quant_storage == "auto":
        context.say_once(
            logging.INFO,
            f"qlora: {engine} shards the model, so the 4-bit weights are stored as {compute} "
            f"(quant_storage='auto': {why})",
        )
    elif recipe.quant_storage != compute:
        raise QLoRAConfigError(
            "quant_storage",
            recipe.quant_storage,
            f"under {engine} the 4-bit weights must be stored in the compute dtype {compute}, {failure}",
            f"set quant_storage='auto' or '{compute}' (the compute dtype)",
        )
    if engine == FSDP_NAME:
        guard_float_storage(context)
    return compute_dtype


def quantization_config(recipe: RecipeFields, context: RunContext) -> Any:
    """The plugins' quantization config that loads the base for the run of ``context`` (bitsandbytes 4-bit).

    ``None`` where the recipe quantizes its targets itself (:mod:`qlora_plugin.build.target_quantization`):
    the base then loads in 16 bits.
    """
    if quantizes_targets_itself(recipe):
        return None
    return plugins_quantization_config(
        recipe, context.compute_dtype, storage_dtype(recipe, context.compute_dtype, context)
    )


def quantize_linear(
    layer: Any, recipe: RecipeFields, compute_dtype: torch.dtype, context: RunContext | None = None
) -> nn.Module:
    """Return a bitsandbytes ``Linear4bit`` holding ``layer``'s weight in 4 bits.

    ``layer`` is an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose weight is stored
    transposed). The result lives on the device of ``layer``'s weight. ``context``: the run
    the layer belongs to (default: one from the launch), which decides the storage dtype.
    """
    weight = layer.weight.detach()
    device = layer.weight.device  # this rank's device: the 4-bit layer stays where the 16-bit one was
    storage = storage_dtype(recipe, compute_dtype, context or make_context(recipe))
    if isinstance(layer, Conv1D):
        weight = weight.t()
    out_features, in_features = weight.shape
    quantized = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=layer.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=recipe.double_quant,
        quant_type=recipe.quant_type,
        quant_storage=storage,
        device="meta",
    )
    quantized.weight = bnb.nn.Params4bit(
        weight.contiguous(),
        requires_grad=False,
        compress_statistics=recipe.double_quant,
        quant_type=recipe.quant_type,
        quant_storage=storage,
        blocksize=recipe.blocksize,
        module=quantized,  # quantizing then sets quantized.quant_state, which bitsandbytes reads back under FSDP
    )
    if layer.bias is not None:
        quantized.bias = layer.bias
    return quantized.to(device)


def is_4bit(layer: nn.Module) -> bool:
    """True if ``layer`` is a bitsandbytes 4-bit linear layer."""
    return isinstance(layer, bnb.nn.Linear4bit)


def keep_nf4_layout(model: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer of ``model`` (or ``model`` itself) in its NF4/FP4 layout.

    On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit``'s weight in place the
    first time the layer runs in eval mode without grad. A repacked layer then computes
    without an input gradient in training, and everything that reads the weight as 4-bit
    data (the fast path's kernels, merging) sees another layout. This turns the repacking
    off on each layer and converts back, through bitsandbytes' own inverse, a layer that
    was already repacked. Returns the number of 4-bit layers seen.
    """
    if not allowed("bnb-cpu-weight-repack"):
        return 0
    layers: list[Any] = [model] if is_4bit(model) else [m for m in model.modules() if is_4bit(m)]
    for layer in layers:
        restore_nf4_layout(layer)
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
    return len(layers)


def restore_nf4_layout(layer: Any) -> bool:
    """Convert a weight bitsandbytes repacked for its CPU kernel back to the 4-bit layout; True if it was."""
    weight = layer.weight
    state: Any = getattr(weight, "quant_state", None)  # bitsandbytes' QuantState, if any
    if not getattr(state, "packing_format_for_cpu", False):
        return False
    weight.data, weight.quant_state = bnb_functional._convert_weight_packed_for_cpu_inverse(weight.data, state)
    if getattr(layer, "quant_state", None) is not None:
        layer.quant_state = weight.quant_state
    return True
