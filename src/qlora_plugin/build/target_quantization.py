"""The recipe's own quantization of its targets: the quality options of issue 28.

transformers' 4-bit loading quantizes every linear layer at bitsandbytes' block size 64 and
drops the 16-bit weights. Three recipe fields need more, so with any of them the base loads
in 16 bits and the LoRA layer factory (:mod:`qlora_plugin.build.lora_layers`) quantizes each
target itself (:attr:`QLoRARecipe.quantizes_targets_itself`):

* ``blocksize``: the block size of the 4-bit grid (32 gives each scale half as many weights);
* ``adapter_init="loftq"``: the adapter starts as the best rank-r approximation of its layer's
  quantization error, so base plus adapter starts nearer the 16-bit layer (LoftQ, Li et al.
  2023, arXiv:2310.08659, with one alternating step; PEFT's ``replace_lora_weights_loftq`` does
  the same on CUDA, but ignores the LoRA scaling ``lora_alpha / r``, which is divided out here);
* ``unquantized_modules``: targets whose base stays in the compute dtype.

``qlora merge`` rebuilds the base training saw with :func:`roundtrip`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from torch import nn
from transformers.pytorch_utils import Conv1D

from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.targets import user_excluded

if TYPE_CHECKING:
    from qlora_plugin.core.recipe import QLoRARecipe


def keeps_16bit(recipe: QLoRARecipe, name: str | None) -> bool:
    """True if ``name`` (a module's full name) is one of the recipe's ``unquantized_modules``."""
    return bool(name) and user_excluded(name or "", recipe.unquantized_modules)


def weight_out_in(layer: nn.Module) -> torch.Tensor:
    """``layer``'s 16-bit weight as (out_features, in_features): a GPT-2 ``Conv1D`` stores it transposed."""
    weight: torch.Tensor = layer.weight.detach()  # type: ignore[operator]  # an nn.Linear's or Conv1D's
    return weight.t() if isinstance(layer, Conv1D) else weight


def check_prequantized(layer: nn.Module, recipe: QLoRARecipe, name: str | None) -> None:
    """Refuse a target already in 4 bits where the recipe needed its 16-bit weight or another block size."""
    weight: Any = layer.weight
    state = getattr(weight, "quant_state", None)
    problem = None
    if recipe.adapter_init == "loftq":
        problem = "adapter_init='loftq' needs each target's 16-bit weight, and this base was loaded in 4 bits"
    elif keeps_16bit(recipe, name):
        problem = f"unquantized_modules names {name}, and this base was loaded in 4 bits"
    elif state is not None and state.blocksize != recipe.blocksize:
        problem = f"blocksize={recipe.blocksize}, and this base was loaded in 4 bits at blocksize {state.blocksize}"
    if problem:
        raise QLoRAConfigError(
            "model",
            name,
            problem,
            "let the recipe load the model (SFTTrainer(model=<path>, args=recipe.sft_config(...)) or "
            "recipe.load_model(path)), or load it in 16 bits: the recipe then quantizes the targets itself",
        )


def loftq_init(layer: Any, weight: torch.Tensor, adapter_name: str) -> float:
    """Set ``layer``'s adapter to the rank-r SVD of ``weight`` minus its 4-bit base, over the LoRA scaling.

    ``layer``: PEFT's LoRA layer over a bitsandbytes 4-bit base; ``weight``: that base's 16-bit
    weight as (out, in). Returns the share of the quantization error's energy the adapter removes
    (0 to 1), which the benchmarks report.
    """
    base = layer.get_base_layer()
    with torch.no_grad():
        residual = weight.float() - dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        rank = layer.r[adapter_name]
        root = s[:rank].sqrt() / float(layer.scaling[adapter_name]) ** 0.5
        lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        lora_b.copy_((u[:, :rank] * root).to(lora_b.dtype))
        lora_a.copy_((root[:, None] * vh[:rank]).to(lora_a.dtype))
        total = float((s**2).sum())
        return float((s[:rank] ** 2).sum()) / total if total else 0.0


def roundtrip(weight: torch.Tensor, recipe: QLoRARecipe) -> torch.Tensor:
    """``weight`` (out, in) quantized as the recipe trains it and dequantized again, in its own dtype."""
    packed, state = quantize_4bit(
        weight.contiguous(),
        blocksize=recipe.blocksize,
        quant_type=recipe.quant_type,
        compress_statistics=recipe.double_quant,
    )
    return dequantize_4bit(packed, state).to(weight.dtype)
