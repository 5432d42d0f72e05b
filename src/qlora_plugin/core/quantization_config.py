"""The recipe's 4-bit format as a transformers config: the built-in answer of the quantization hook."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qlora_plugin.core.hookspecs import RecipeFields, hookimpl

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig

BLOCKSIZE = 64  # bitsandbytes' 4-bit block size; transformers does not expose it


def bnb_config(recipe: RecipeFields, compute_dtype: torch.dtype, storage_dtype: torch.dtype) -> BitsAndBytesConfig:
    """The recipe's quantization as a transformers ``BitsAndBytesConfig``, the packed weights in ``storage_dtype``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=recipe.quant_type,
        bnb_4bit_use_double_quant=recipe.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage_dtype,
    )


@hookimpl(trylast=True)
def qlora_quantization_config(
    recipe: RecipeFields, compute_dtype: torch.dtype, storage_dtype: torch.dtype
) -> BitsAndBytesConfig:
    """The built-in backend: bitsandbytes 4-bit."""
    return bnb_config(recipe, compute_dtype, storage_dtype)
