"""The recipe's trainer settings, as transformers ``TrainingArguments`` fields, and its optimizer in a Trainer."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

from qlora_plugin.core.device import precision_flags, training_device
from qlora_plugin.core.distributed import (
    current_launch,
    deepspeed_in_effect,
    fsdp_in_effect,
    optimizer_under_fsdp,
    sharding_engine,
    zero3_in_effect,
)

if TYPE_CHECKING:
    from qlora_plugin.core.recipe import QLoRARecipe

OPTIONAL_SETTINGS = ("num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps")


def training_args(recipe: QLoRARecipe, device: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``TrainingArguments`` (and TRL's configs) from ``recipe``.

    Precision follows the device: bf16/fp16 mixed precision on a GPU, neither
    on a CPU (where the trainers refuse them). On the CUDA fast path, also the
    settings of :data:`qlora_plugin.fastpath.activation.FAST_TRAINER_SETTINGS`. Under a
    multi-process launch on a machine without CUDA, ``use_cpu=True`` (DDP over gloo), or under
    DeepSpeed ``ddp_backend="gloo"`` (DeepSpeed's CPU accelerator: accelerate runs DeepSpeed only
    without ``use_cpu``, and counts its processes only with a backend named). Where FSDP or
    DeepSpeed ZeRO-3 shards the model, a bitsandbytes optimizer becomes torch's AdamW.
    """
    from qlora_plugin.fastpath.activation import trainer_settings

    device = device or training_device()
    settings: dict[str, Any] = {
        "optim": recipe.optimizer,
        "learning_rate": recipe.learning_rate,
        "max_grad_norm": recipe.max_grad_norm,
        "lr_scheduler_type": recipe.lr_scheduler_type,
        "warmup_steps": recipe.warmup_ratio,  # transformers 5: a float below 1 is a ratio
        "gradient_checkpointing": bool(recipe.gradient_checkpointing),  # "offload" is recompute too
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if recipe.gradient_checkpointing else None,
        **precision_flags(recipe.resolved_compute_dtype(device), device),
    }
    settings.update({name: getattr(recipe, name) for name in OPTIONAL_SETTINGS if getattr(recipe, name) is not None})
    if device == "cpu" and current_launch().distributed and (deepspeed_in_effect(recipe) or zero3_in_effect(recipe)):
        settings["ddp_backend"] = "gloo"
    elif device == "cpu" and current_launch().distributed:
        # Without it, transformers on a machine without a GPU sets up no DDP (accelerate picks
        # gloo only when told "cpu"), and each rank silently trains its own copy on all the data.
        settings["use_cpu"] = True
    settings.update(trainer_settings(recipe, device))
    engine = sharding_engine(recipe)
    optimizer = optimizer_under_fsdp(recipe.optimizer) if engine else recipe.optimizer
    if optimizer != recipe.optimizer:
        settings["optim"] = optimizer
        from qlora_plugin.core.notices import log_once

        why = (
            "bitsandbytes' optimizers cannot update FSDP's sharded parameters"
            if engine == "FSDP"
            else "ZeRO-3 steps its flat fp32 partitions of the adapters, with the fast path's fused optimizer off"
        )
        log_once(
            logging.INFO,
            f"qlora under {engine}: optim {settings['optim']} instead of {recipe.optimizer} "
            f"({why}; same update, 32-bit states, sharded)",
            recipe,
        )
    return settings


def describe_settings(settings: dict[str, Any]) -> str:
    """A short human line for a settings dict: ``optim=paged_adamw_32bit, ...``."""
    return ", ".join(f"{key}={value}" for key, value in settings.items())


def fused_optimizer_for(args: Any, model: Any) -> tuple[type, dict[str, Any]] | None:
    """The fused paged AdamW for a trainer about to build its optimizer over a recipe's model, else None.

    Answers where ``optim`` is ``paged_adamw_32bit`` (the recipe's) or left at the config's
    default (a user's own ``SFTConfig`` that names no optimizer: the recipe's QLoRA optimizer
    applies, one line says so): the same update and paged 32-bit moments as bitsandbytes'.
    None for a model the recipe did not build, another ``optim``, ``optim_args``, or off the
    fast path. When it answers, the model's trainable weights are float32 (cast back if a
    trainer made them bf16), the master weights the fast path keeps.
    """
    from qlora_plugin.core.notices import log_once, recipe_of_model

    optim = getattr(getattr(args, "optim", None), "value", getattr(args, "optim", None))
    left_default = optim == optim_default(args)
    if model is None or not (optim == "paged_adamw_32bit" or left_default) or getattr(args, "optim_args", None):
        return None
    recipe = recipe_of_model(model)
    if recipe is None or recipe.optimizer != "paged_adamw_32bit":
        return None
    fused = fused_optimizer_over(model, recipe, args)
    if fused is not None and left_default and optim != "paged_adamw_32bit":
        log_once(
            logging.INFO,
            f"qlora: optim is left at its default ({optim}); training with the recipe's paged AdamW with 32-bit "
            "states (fused). Name another optim in your config to train with it instead.",
            recipe,
        )
    return fused


def optim_default(args: Any) -> str | None:
    """The ``optim`` a config class gives when none is named (transformers 5: ``adamw_torch_fused``)."""
    import dataclasses

    if not dataclasses.is_dataclass(args):
        return None
    field = next((f for f in dataclasses.fields(args) if f.name == "optim"), None)
    if field is None or field.default is dataclasses.MISSING:
        return None
    return str(getattr(field.default, "value", field.default))


def fused_optimizer_over(model: Any, recipe: Any, args: Any) -> tuple[type, dict[str, Any]] | None:
    """The recipe's fused paged AdamW for ``model`` (None off the fast path), its adapters made float32 for it.

    Its moments are 32-bit for 32-bit weights only. TRL's trainers round a 4-bit model's
    adapters to bf16 when they are built, and where the fast path does not run the model
    (Axolotl's DPO) nothing casts them back before the first step: float32 masters here.
    """
    from qlora_plugin.fastpath.activation import optimizer_cls_and_kwargs

    fused = optimizer_cls_and_kwargs(recipe, args)
    if fused is not None:
        import torch

        from qlora_plugin.fastpath.kernels.casting import cast_adapters

        cast_adapters(model, torch.float32)
    return fused


def sharded_optimizer_args(args: Any, model: Any) -> Any:
    """``args``, or a copy naming torch's AdamW where FSDP shards a recipe's model and ``optim`` is bitsandbytes'.

    bitsandbytes' optimizers cannot update FSDP2's sharded (DTensor) parameters: the first
    step fails ("Operator bitsandbytes.optimizer_update_32bit.default does not have a sharding
    strategy registered"). ``recipe.sft_config()`` already names ``adamw_torch`` there; a
    user's own ``SFTConfig(optim="paged_adamw_32bit")`` gets the same here, with one warning:
    the same update with 32-bit states, sharded with the parameters.
    """
    import copy

    from qlora_plugin.core.notices import log_once, recipe_of_model

    optim = getattr(getattr(args, "optim", None), "value", getattr(args, "optim", None))
    if model is None or not isinstance(optim, str) or optimizer_under_fsdp(optim) == optim:
        return args
    recipe = recipe_of_model(model)
    if recipe is None or not fsdp_in_effect(recipe):
        return args
    replacement = optimizer_under_fsdp(optim)
    log_once(
        logging.WARNING,
        f"qlora: FSDP shards the model, and optim='{optim}' (bitsandbytes) cannot update sharded parameters; "
        f"training with optim='{replacement}' (torch's AdamW: the same update with 32-bit states, sharded). "
        f"Set optim='{replacement}' to silence this.",
        recipe,
    )
    changed = copy.copy(args)
    changed.optim = replacement
    changed.optim_args = None
    return changed


@functools.cache
def offer_fused_optimizer() -> bool:
    """Let transformers' Trainer choose the fused paged AdamW for the recipe's models (once per process).

    A Trainer builds the optimizer ``optim=`` names through its static
    ``get_optimizer_cls_and_kwargs(args, model)`` unless it was given
    ``optimizer_cls_and_kwargs`` or ``optimizers``. The wrapper answers only for a
    model the recipe built (:func:`fused_optimizer_for`) and defers to transformers
    for every other model, so ``SFTTrainer(..., args=recipe.sft_config(...),
    peft_config=recipe)``, a user's own ``optim="paged_adamw_32bit"`` and a user's config
    that names no ``optim`` need no extra argument. Outside the tested transformers versions nothing is wrapped
    (:mod:`qlora_plugin.core.patches`). Returns whether the wrapper is in place.
    """
    from qlora_plugin.core.patches import allowed

    if not allowed("transformers-trainer-optimizer-choice"):
        return False
    from transformers import Trainer

    original = Trainer.get_optimizer_cls_and_kwargs

    def get_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[Any, Any]:
        fused = fused_optimizer_for(args, model)
        if fused is not None:
            return fused
        return original(sharded_optimizer_args(args, model), model)

    get_optimizer_cls_and_kwargs.__wrapped__ = original  # type: ignore[attr-defined]
    Trainer.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)  # type: ignore[method-assign]
    return True
