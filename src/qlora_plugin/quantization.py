"""4-bit quantization of the frozen base: the built-in bitsandbytes backend."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qlora_plugin.hookspecs import hookimpl

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import BitsAndBytesConfig

    from qlora_plugin.recipe import QLoRARecipe

BLOCKSIZE = 64  # bitsandbytes' 4-bit block size; transformers does not expose it


def bnb_config(recipe: QLoRARecipe, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """The recipe's quantization as a transformers ``BitsAndBytesConfig``."""
    from transformers import BitsAndBytesConfig

    from qlora_plugin.device import torch_dtype

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=recipe.quant_type,
        bnb_4bit_use_double_quant=recipe.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch_dtype(recipe.quant_storage),
    )


@hookimpl(trylast=True)
def qlora_quantization_config(recipe: QLoRARecipe, compute_dtype: Any) -> BitsAndBytesConfig:
    """The built-in backend: bitsandbytes 4-bit."""
    return bnb_config(recipe, compute_dtype)


def quantize_linear(layer: nn.Module, recipe: QLoRARecipe, compute_dtype: torch.dtype) -> nn.Module:
    """Return a bitsandbytes ``Linear4bit`` holding ``layer``'s weight in 4 bits.

    ``layer`` is an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose weight is stored
    transposed). The result lives on the device of ``layer``'s weight.
    """
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    from qlora_plugin.device import torch_dtype

    weight = layer.weight.detach()
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
        quant_storage=torch_dtype(recipe.quant_storage),
        device="meta",
    )
    quantized.weight = bnb.nn.Params4bit(
        weight.contiguous(),
        requires_grad=False,
        compress_statistics=recipe.double_quant,
        quant_type=recipe.quant_type,
        quant_storage=torch_dtype(recipe.quant_storage),
        blocksize=BLOCKSIZE,
    )
    if layer.bias is not None:
        quantized.bias = layer.bias
    return quantized.to(layer.weight.device)


def is_4bit(layer: nn.Module) -> bool:
    """True if ``layer`` is a bitsandbytes 4-bit linear layer."""
    import bitsandbytes as bnb

    return isinstance(layer, bnb.nn.Linear4bit)
