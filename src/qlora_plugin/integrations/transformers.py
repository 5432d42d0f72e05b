"""The recipe's trainer settings, as transformers ``TrainingArguments`` fields, and its optimizer in a Trainer."""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch

from qlora_plugin.build.context import RunContext, context_of
from qlora_plugin.build.distributed import FSDP_NAME, optimizer_under_fsdp
from qlora_plugin.build.lora_layers import context_for
from qlora_plugin.build.trainer_settings import fast_trainer_settings, run_of, settings_for
from qlora_plugin.core import patches
from qlora_plugin.fastpath.kernels.casting import cast_adapters
from qlora_plugin.fastpath.optimizer import optimizer_cls_and_kwargs

if TYPE_CHECKING:
    from qlora_plugin.core.recipe import QLoRARecipe

PATCH = "transformers-trainer-optimizer-choice"


def training_args(recipe: QLoRARecipe, device: str | None = None) -> dict[str, Any]:
    """``recipe.training_args(device)``: :func:`settings_of` in the recipe's run context."""
    return settings_of(recipe, context_for(recipe), device)


def settings_of(recipe: QLoRARecipe, context: RunContext, device: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``TrainingArguments`` (and TRL's configs) from ``recipe`` in the run of ``context``.

    The settings of :data:`qlora_plugin.build.trainer_settings.SETTINGS`. Precision follows the
    device (default: the run's): bf16/fp16 mixed precision on a GPU, neither on a CPU (where
    the trainers refuse them). On the fast path, also
    :data:`qlora_plugin.build.trainer_settings.FAST_TRAINER_SETTINGS`. Under a multi-process
    launch on a machine without CUDA, ``use_cpu=True`` (DDP over gloo), or under DeepSpeed
    ``ddp_backend="gloo"`` (DeepSpeed's CPU accelerator: accelerate runs DeepSpeed only
    without ``use_cpu``, and counts its processes only with a backend named). Where FSDP or
    DeepSpeed ZeRO-3 shards the model, a bitsandbytes optimizer becomes torch's AdamW.
    """
    run = run_of(recipe, context, device)
    settings = settings_for(run, "transformers")
    if run.device == "cpu" and context.launch.distributed and context.deepspeed:
        settings["ddp_backend"] = "gloo"
    elif run.device == "cpu" and context.launch.distributed:
        # Without it, transformers on a machine without a GPU sets up no DDP (accelerate picks
        # gloo only when told "cpu"), and each rank silently trains its own copy on all the data.
        settings["use_cpu"] = True
    settings.update(fast_trainer_settings(context, run.device))
    if context.optimizer != context.requested_optimizer:
        why = (
            "bitsandbytes' optimizers cannot update FSDP's sharded parameters"
            if context.sharding == FSDP_NAME
            else "ZeRO-3 steps its flat fp32 partitions of the adapters, with the fast path's fused optimizer off"
        )
        context.say_once(
            logging.INFO,
            f"qlora under {context.sharding}: optim {context.optimizer} instead of {context.requested_optimizer} "
            f"({why}; same update, 32-bit states, sharded)",
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
    optim = getattr(getattr(args, "optim", None), "value", getattr(args, "optim", None))
    left_default = optim == optim_default(args)
    if model is None or not (optim == "paged_adamw_32bit" or left_default) or getattr(args, "optim_args", None):
        return None
    context = context_of(model)
    if context is None or context.requested_optimizer != "paged_adamw_32bit":
        return None
    fused = fused_optimizer_over(model, context, args)
    if fused is not None and left_default and optim != "paged_adamw_32bit":
        context.say_once(
            logging.INFO,
            f"qlora: optim is left at its default ({optim}); training with the recipe's paged AdamW with 32-bit "
            "states (fused). Name another optim in your config to train with it instead.",
        )
    return fused


def optim_default(args: Any) -> str | None:
    """The ``optim`` a config class gives when none is named (transformers 5: ``adamw_torch_fused``)."""
    if not dataclasses.is_dataclass(args):
        return None
    field = next((f for f in dataclasses.fields(args) if f.name == "optim"), None)
    if field is None or field.default is dataclasses.MISSING:
        return None
    return str(getattr(field.default, "value", field.default))


def fused_optimizer_over(model: Any, context: RunContext, args: Any) -> tuple[type, dict[str, Any]] | None:
    """The run's fused paged AdamW for ``model`` (None off the fast path), its adapters made float32 for it.

    Its moments are 32-bit for 32-bit weights only. TRL's trainers round a 4-bit model's
    adapters to bf16 when they are built, and where the fast path does not run the model
    (Axolotl's DPO) nothing casts them back before the first step: float32 masters here.
    """
    fused = optimizer_cls_and_kwargs(context, args)
    if fused is not None:
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
    optim = getattr(getattr(args, "optim", None), "value", getattr(args, "optim", None))
    if model is None or not isinstance(optim, str) or optimizer_under_fsdp(optim) == optim:
        return args
    context = context_of(model)
    if context is None or context.sharding != FSDP_NAME:
        return args
    replacement = optimizer_under_fsdp(optim)
    context.say_once(
        logging.WARNING,
        f"qlora: FSDP shards the model, and optim='{optim}' (bitsandbytes) cannot update sharded parameters; "
        f"training with optim='{replacement}' (torch's AdamW: the same update with 32-bit states, sharded). "
        f"Set optim='{replacement}' to silence this.",
    )
    changed = copy.copy(args)
    changed.optim = replacement
    changed.optim_args = None
    return changed


def offer_fused_optimizer() -> bool:
    """Let transformers' Trainer choose the fused paged AdamW for the recipe's models (once per process).

    A Trainer builds the optimizer ``optim=`` names through its static
    ``get_optimizer_cls_and_kwargs(args, model)`` unless it was given
    ``optimizer_cls_and_kwargs`` or ``optimizers``. The wrapper answers only for a
    model the recipe built (:func:`fused_optimizer_for`) and defers to transformers
    for every other model, so ``SFTTrainer(..., args=recipe.sft_config(...),
    peft_config=recipe)``, a user's own ``optim="paged_adamw_32bit"`` and a user's config
    that names no ``optim`` need no extra argument. Installed through the patch registry
    (:mod:`qlora_plugin.core.patches`), which leaves it out outside the tested transformers
    versions and can undo it. Returns whether the wrapper is in place.
    """
    return patches.apply(PATCH, _choosing_fused)


def _choosing_fused(original: Any) -> Any:
    """Trainer's ``get_optimizer_cls_and_kwargs``, answering the fused paged AdamW for the recipe's models."""

    def get_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[Any, Any]:
        fused = fused_optimizer_for(args, model)
        if fused is not None:
            return fused
        return original(sharded_optimizer_args(args, model), model)

    get_optimizer_cls_and_kwargs.__wrapped__ = original  # type: ignore[attr-defined]
    return get_optimizer_cls_and_kwargs
