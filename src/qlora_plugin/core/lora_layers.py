"""The LoRA layer PEFT puts on each target: always over a 4-bit base.

The recipe registers :func:`make_lora_layer` with PEFT's custom-module dispatch
for ``nn.Linear`` and ``Conv1D``. A base layer that is already a bitsandbytes
4-bit layer gets PEFT's own 4-bit LoRA layer; a plain layer (a model loaded in
bf16 or fp32) is quantized with the recipe first, so the frozen base is 4-bit
however the model was loaded. Each layer built is handed to the ``lora_layer_built`` seam,
where the fast path arms itself for the model's first training forward.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from qlora_plugin.core import seams
from qlora_plugin.core.adapter_shapes import guard_adapter_shapes
from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.notices import log_once, watch_optimizer
from qlora_plugin.core.run_record import BaseFormat, note_built_layer

if TYPE_CHECKING:
    from torch import nn

    from qlora_plugin.core.recipe import QLoRARecipe


def make_lora_layer(target: nn.Module, adapter_name: str, config: QLoRARecipe, **kwargs: Any) -> nn.Module | None:
    """Build the LoRA layer for ``target``; ``None`` leaves it to PEFT's dispatchers."""
    import torch
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    from transformers.pytorch_utils import Conv1D

    from qlora_plugin.core.fsdp_bytes import guard_packed_weights
    from qlora_plugin.core.quantization import is_4bit, keep_nf4_layout, quantize_linear

    if getattr(config, "_resolved_by_peft", False) and config.target_parameters:
        raise QLoRAConfigError(
            "target_modules",
            "auto",
            "on this mixture-of-experts model PEFT widens 'all-linear' to the fused expert and router "
            f"parameters {sorted(config.target_parameters)} (its transformers-v4 compatibility), which the "
            "built-in rule skips",
            "discover the targets on the model first: qlora_recipe(..., model=<path or model>) or "
            "recipe.resolve(model)",
        )
    name = kwargs.get("target_name")
    weight16 = None  # the 16-bit weight, kept for a LoftQ start
    if not is_4bit(target):
        if type(target) not in (torch.nn.Linear, Conv1D):
            return None  # another quantization backend's layer: PEFT knows it
        # -- quality options (issue 28): targets kept in 16 bits, LoftQ starts (core.target_quantization)
        from qlora_plugin.core.target_quantization import keeps_16bit, weight_out_in

        if keeps_16bit(config, name):
            return _lora_16bit(target, adapter_name, config, **kwargs)
        if config.adapter_init == "loftq":
            weight16 = weight_out_in(target)
        # -- end of the quality options
        weight: Any = target.weight  # an nn.Linear's or Conv1D's
        device = weight.device.type
        target = quantize_linear(target, config, config.resolved_compute_dtype(device))
        if not config.quantizes_targets_itself:
            log_once(
                logging.WARNING,
                "the base model was not loaded in 4 bits: its target layers are quantized to "
                f"{config.quant_type} now (double quant {config.double_quant}). Loading it through "
                "args=recipe.sft_config(...) or recipe.load_model(...) avoids holding a 16-bit copy first.",
                config,
            )
    elif config.quantizes_targets_itself:
        from qlora_plugin.core.target_quantization import check_prequantized

        check_prequantized(target, config, name)
    keep_nf4_layout(target)
    guard_packed_weights(target, config)
    kwargs["fan_in_fan_out"] = False  # the 4-bit base stores (out, in) even for Conv1D
    from qlora_plugin.core.seeding import seeded_layer_init

    with seeded_layer_init(name):
        layer = LoraLinear4bit(target, adapter_name, config=config, **kwargs)
    if weight16 is not None:
        from qlora_plugin.core.target_quantization import loftq_init

        loftq_init(layer, weight16, adapter_name)
    note_built_layer(layer, config, name)
    guard_adapter_shapes(layer)
    report_base_format(target, config)
    watch_optimizer(layer, config)
    seams.call("lora_layer_built", layer, config)  # the fast path arms itself here (qlora_plugin.core.seams)
    return layer


def report_base_format(target: nn.Module, recipe: QLoRARecipe) -> None:
    """Say once, as a warning, where the base was loaded in another 4-bit format than the recipe's.

    The run trains over what was loaded (a model loaded in FP4 by hand stays FP4), and
    ``qlora_recipe.json`` records that (:mod:`qlora_plugin.core.run_record`).
    """
    found = BaseFormat.of_layer(target)
    if found is None or (found.quant_type, found.double_quant) == (recipe.quant_type, recipe.double_quant):
        return
    log_once(
        logging.WARNING,
        f"the base model was loaded as {found.describe()}, but the recipe says {recipe.quant_type} "
        f"(double quant {recipe.double_quant}): training runs over {found.quant_type}, and qlora_recipe.json records "
        f"{found.quant_type}. To train over {recipe.quant_type}, load the model with recipe.load_model(...) or "
        "args=recipe.sft_config(...); to silence this, set the recipe's quant_type and double_quant to match",
        recipe,
    )


def _lora_16bit(target: nn.Module, adapter_name: str, config: QLoRARecipe, **kwargs: Any) -> nn.Module:
    """PEFT's plain LoRA layer over a 16-bit target the recipe keeps out of 4 bits (``unquantized_modules``)."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from transformers.pytorch_utils import Conv1D

    from qlora_plugin.core.seeding import seeded_layer_init

    conv1d = isinstance(target, Conv1D)  # stores its weight transposed: PEFT's fan_in_fan_out
    kwargs.update(fan_in_fan_out=conv1d, is_target_conv_1d_layer=conv1d)
    with seeded_layer_init(kwargs.get("target_name")):
        layer = LoraLinear(target, adapter_name, config=config, **kwargs)
    note_built_layer(layer, config, kwargs.get("target_name"))
    guard_adapter_shapes(layer)
    watch_optimizer(layer, config)
    seams.call("lora_layer_built", layer, config)
    return layer
