"""The LoRA layer PEFT puts on each target: always over a 4-bit base, built for one run.

Every recipe registers a :class:`LoraLayerFactory` with PEFT's custom-module dispatch for
``nn.Linear`` and ``Conv1D`` (:func:`register_factory`, called from the recipe through the
``lora_layer_factory`` seam). A base layer that is already a bitsandbytes 4-bit layer gets
PEFT's own 4-bit LoRA layer; a plain layer (a model loaded in bf16 or fp32) is quantized
with the recipe first, so the frozen base is 4-bit however the model was loaded.

PEFT hands the factory nothing but the recipe, so the factory finds the run its layers belong
to: for layers built while a trainer is constructed, the run context of that trainer's
arguments (the one ``recipe.sft_config()`` attached to the config it made, or one made once
from a user's own config, with its ``seed``); otherwise the factory's own, made from the
launch when first asked (:func:`context_for`) and kept. Each layer built carries the context
(so the PEFT model does), its ``lora_A`` is drawn from the context's seed, the process records
it (:mod:`qlora_plugin.core.run_record`), it refuses adapter weights of another rank
(:mod:`qlora_plugin.core.adapter_shapes`), and it is handed to the ``lora_layer_built`` seam,
where the fast path arms itself for the model's first training forward. PEFT's LoRA over fused
MoE experts (``target_parameters``) is built the same way (:mod:`qlora_plugin.build.moe_experts`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

import torch
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn
from transformers.pytorch_utils import Conv1D

from qlora_plugin.build.context import RunContext, attach, context_of_args, make_context
from qlora_plugin.build.fsdp_bytes import guard_packed_weights
from qlora_plugin.build.length_check import check_max_length
from qlora_plugin.build.moe_experts import make_expert_lora_layer
from qlora_plugin.build.notices import watch_optimizer
from qlora_plugin.build.quantization import is_4bit, keep_nf4_layout, quantize_linear
from qlora_plugin.build.seeding import seeded_layer_init
from qlora_plugin.build.target_quantization import check_prequantized, keeps_16bit, loftq_init, weight_out_in
from qlora_plugin.build.trainer_frame import trainer_being_built
from qlora_plugin.core import seams
from qlora_plugin.core.adapter_shapes import guard_adapter_shapes
from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.patches import allowed
from qlora_plugin.core.run_record import BaseFormat, note_built_layer

if TYPE_CHECKING:
    from qlora_plugin.core.recipe import QLoRARecipe

PATCH = "peft-lora-layer-factory"


class LoraLayerFactory:
    """Builds the LoRA layer for each target PEFT meets, in the run of :attr:`context`.

    ``context``: the run the layers belong to; None until the first layer (or
    :func:`context_for`) makes one from the launch.
    """

    def __init__(self, context: RunContext | None = None) -> None:
        self.context = context

    def context_for(self, recipe: QLoRARecipe) -> RunContext:
        """The factory's own run context, for layers built outside a trainer (made from the launch on first use)."""
        if self.context is None:
            self.context = make_context(recipe)
        return self.context

    def context_for_layer(self, recipe: QLoRARecipe) -> RunContext:
        """The run a layer built now belongs to: the trainer's being constructed, else the factory's own."""
        trainer = trainer_being_built()
        if trainer is None:
            return self.context_for(recipe)
        args = trainer.args
        context = context_of_args(args)
        if context is None:  # a user's own config: one run per config, with its seed
            context = make_context(recipe, seed=args.seed)
            attach(args, context)
        check_max_length(args, trainer.model, context.logger)
        return context

    def __call__(self, target: nn.Module, adapter_name: str, config: QLoRARecipe, **kwargs: Any) -> nn.Module | None:
        """Build the LoRA layer for ``target``; ``None`` leaves it to PEFT's dispatchers."""
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
        if not is_4bit(target) and type(target) not in (torch.nn.Linear, Conv1D):
            return None  # another quantization backend's layer: PEFT knows it
        context = self.context_for_layer(config)
        name = kwargs.get("target_name")
        weight16 = None  # the 16-bit weight, kept for a LoftQ start (the quality options, build.target_quantization)
        if not is_4bit(target):
            if keeps_16bit(config, name):
                return self._lora_16bit(target, adapter_name, config, context, **kwargs)
            if config.adapter_init == "loftq":
                weight16 = weight_out_in(target)
            weight: Any = target.weight  # an nn.Linear's or Conv1D's
            target = quantize_linear(target, config, config.resolved_compute_dtype(weight.device.type), context)
            if not config.quantizes_targets_itself:
                context.say_once(
                    logging.WARNING,
                    "the base model was not loaded in 4 bits: its target layers are quantized to "
                    f"{config.quant_type} now (double quant {config.double_quant}). Loading it through "
                    "args=recipe.sft_config(...) or recipe.load_model(...) avoids holding a 16-bit copy first.",
                )
        elif config.quantizes_targets_itself:
            check_prequantized(target, config, name)
        keep_nf4_layout(target)
        guard_packed_weights(target, context)
        kwargs["fan_in_fan_out"] = False  # the 4-bit base stores (out, in) even for Conv1D
        with seeded_layer_init(context.seed, name):
            layer = LoraLinear4bit(target, adapter_name, config=config, **kwargs)
        if weight16 is not None:
            loftq_init(layer, weight16, adapter_name)
        attach(layer, context)
        note_built_layer(layer, config, name)
        guard_adapter_shapes(layer)
        report_base_format(target, config, context)
        watch_optimizer(layer, context)
        seams.call("lora_layer_built", layer, config, context)  # the fast path arms itself here
        return layer

    def _lora_16bit(
        self, target: nn.Module, adapter_name: str, config: QLoRARecipe, context: RunContext, **kwargs: Any
    ) -> nn.Module:
        """PEFT's plain LoRA layer over a 16-bit target the recipe keeps out of 4 bits (``unquantized_modules``)."""
        conv1d = isinstance(target, Conv1D)  # stores its weight transposed: PEFT's fan_in_fan_out
        kwargs.update(fan_in_fan_out=conv1d, is_target_conv_1d_layer=conv1d)
        with seeded_layer_init(context.seed, kwargs.get("target_name")):
            layer = LoraLinear(target, adapter_name, config=config, **kwargs)
        attach(layer, context)
        note_built_layer(layer, config, kwargs.get("target_name"))
        guard_adapter_shapes(layer)
        watch_optimizer(layer, context)
        seams.call("lora_layer_built", layer, config, context)
        return layer

    def experts(self, target: nn.Module, adapter_name: str, config: QLoRARecipe, **kwargs: Any) -> nn.Module | None:
        """PEFT's LoRA over fused MoE expert parameters (``target_parameters``), in the same run."""
        return make_expert_lora_layer(target, adapter_name, config, context=self.context_for_layer(config), **kwargs)


def report_base_format(target: nn.Module, recipe: QLoRARecipe, context: RunContext) -> None:
    """Say once, as a warning, where the base was loaded in another 4-bit format than the recipe's.

    The run trains over what was loaded (a model loaded in FP4 by hand stays FP4), and
    ``qlora_recipe.json`` records that (:mod:`qlora_plugin.core.run_record`).
    """
    found = BaseFormat.of_layer(target)
    if found is None or (found.quant_type, found.double_quant) == (recipe.quant_type, recipe.double_quant):
        return
    context.say_once(
        logging.WARNING,
        f"the base model was loaded as {found.describe()}, but the recipe says {recipe.quant_type} "
        f"(double quant {recipe.double_quant}): training runs over {found.quant_type}, and qlora_recipe.json records "
        f"{found.quant_type}. To train over {recipe.quant_type}, load the model with recipe.load_model(...) or "
        "args=recipe.sft_config(...); to silence this, set the recipe's quant_type and double_quant to match",
    )


def register_factory(recipe: QLoRARecipe, context: RunContext | None = None) -> None:
    """Register a :class:`LoraLayerFactory` (bound to ``context``, if given) as the recipe's LoRA layer builder.

    Outside PEFT's tested versions nothing is registered and PEFT builds its own layers.
    """
    if not allowed(PATCH):
        return
    factory = LoraLayerFactory(context)
    # PEFT types the mapping's values as layer classes; it calls them, so factory callables work too.
    # nn.Module last: any module PEFT targets a parameter of (fused MoE experts).
    layers = cast("type[nn.Module]", factory)
    experts = cast("type[nn.Module]", factory.experts)
    recipe._register_custom_module({torch.nn.Linear: layers, Conv1D: layers, nn.Module: experts})


def bind_context(recipe: QLoRARecipe, context: RunContext) -> None:
    """Build the recipe's LoRA layers outside a trainer in the run of ``context`` (a host or a test)."""
    register_factory(recipe, context)


def context_for(recipe: QLoRARecipe) -> RunContext:
    """The recipe's run outside a trainer: the one its LoRA layers are built with there (made from the launch on
    first use).

    Outside PEFT's tested versions the recipe has no factory, and each question asks the launch afresh.
    """
    factory = _factory_of(recipe)
    return factory.context_for(recipe) if factory is not None else make_context(recipe)


def _factory_of(recipe: QLoRARecipe) -> LoraLayerFactory | None:
    builders: Any = recipe._custom_modules or {}
    factory = builders.get(torch.nn.Linear)
    return factory if isinstance(factory, LoraLayerFactory) else None
