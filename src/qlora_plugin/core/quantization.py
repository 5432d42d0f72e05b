"""4-bit quantization of the frozen base: the built-in bitsandbytes backend."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qlora_plugin.core.hookspecs import hookimpl

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import BitsAndBytesConfig

    from qlora_plugin.core.recipe import QLoRARecipe

BLOCKSIZE = 64  # bitsandbytes' 4-bit block size; transformers does not expose it (the recipe's `blocksize` default)


def bnb_config(recipe: QLoRARecipe, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """The recipe's quantization as a transformers ``BitsAndBytesConfig``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=recipe.quant_type,
        bnb_4bit_use_double_quant=recipe.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage_dtype(recipe, compute_dtype),
    )


def storage_dtype(
    recipe: QLoRARecipe, compute_dtype: torch.dtype, fsdp: bool | None = None, zero3: bool | None = None
) -> torch.dtype:
    """The dtype the packed 4-bit weights are stored in (``quant_storage``).

    ``"auto"``: uint8, or where FSDP or DeepSpeed ZeRO-3 shards the model (``fsdp``, ``zero3``;
    default: as the trainer's settings or the launch say,
    :func:`qlora_plugin.core.distributed.sharding_engine`) the compute dtype. Under FSDP that is
    the storage the FSDP QLoRA path of accelerate and Axolotl is built for (FSDP1 cannot flatten
    integer tensors), and FSDP2 is made to all-gather it as bytes
    (:func:`qlora_plugin.core.fsdp_bytes.guard_float_storage`); under ZeRO-3 the storage of
    PEFT's "DeepSpeed ZeRO-3 + QLoRA" guide, one dtype for every parameter ZeRO-3 partitions.
    There an explicit storage dtype other than the compute dtype is an error.
    """
    import logging

    from qlora_plugin.core.device import torch_dtype
    from qlora_plugin.core.distributed import FSDP_NAME, sharding_engine
    from qlora_plugin.core.errors import QLoRAConfigError
    from qlora_plugin.core.notices import log_once

    engine = sharding_engine(recipe, fsdp, zero3)
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
        log_once(
            logging.INFO,
            f"qlora: {engine} shards the model, so the 4-bit weights are stored as {compute} "
            f"(quant_storage='auto': {why})",
            recipe,
        )
    elif recipe.quant_storage != compute:
        raise QLoRAConfigError(
            "quant_storage",
            recipe.quant_storage,
            f"under {engine} the 4-bit weights must be stored in the compute dtype {compute}, {failure}",
            f"set quant_storage='auto' or '{compute}' (the compute dtype)",
        )
    if engine == FSDP_NAME:
        from qlora_plugin.core.fsdp_bytes import guard_float_storage

        guard_float_storage(recipe)
    return compute_dtype


@hookimpl(trylast=True)
def qlora_quantization_config(recipe: QLoRARecipe, compute_dtype: Any) -> BitsAndBytesConfig:
    """The built-in backend: bitsandbytes 4-bit."""
    return bnb_config(recipe, compute_dtype)


def quantize_linear(layer: Any, recipe: QLoRARecipe, compute_dtype: torch.dtype) -> nn.Module:
    """Return a bitsandbytes ``Linear4bit`` holding ``layer``'s weight in 4 bits.

    ``layer`` is an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose weight is stored
    transposed). The result lives on the device of ``layer``'s weight.
    """
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    weight = layer.weight.detach()
    device = layer.weight.device  # this rank's device: the 4-bit layer stays where the 16-bit one was
    storage = storage_dtype(recipe, compute_dtype)
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
    import bitsandbytes as bnb

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
    from qlora_plugin.core.patches import allowed

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
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    if getattr(layer, "quant_state", None) is not None:
        layer.quant_state = weight.quant_state
    return True
