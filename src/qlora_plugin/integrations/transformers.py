"""The recipe's trainer settings, as transformers ``TrainingArguments`` fields."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qlora_plugin.core.device import precision_flags, training_device
from qlora_plugin.core.distributed import current_launch

if TYPE_CHECKING:
    from qlora_plugin.core.recipe import QLoRARecipe

OPTIONAL_SETTINGS = ("num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps")


def training_args(recipe: QLoRARecipe, device: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``TrainingArguments`` (and TRL's configs) from ``recipe``.

    Precision follows the device: bf16/fp16 mixed precision on a GPU, neither
    on a CPU (where the trainers refuse them). On the CUDA fast path, also the
    settings of :data:`qlora_plugin.fastpath.activation.FAST_TRAINER_SETTINGS`. Under a
    multi-process launch on a machine without CUDA, ``use_cpu=True`` (DDP over gloo).
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
    if device == "cpu" and current_launch().distributed:
        # Without it, transformers on a machine without a GPU sets up no DDP (accelerate picks
        # gloo only when told "cpu"), and each rank silently trains its own copy on all the data.
        settings["use_cpu"] = True
    settings.update(trainer_settings(recipe, device))
    return settings


def describe_settings(settings: dict[str, Any]) -> str:
    """A short human line for a settings dict: ``optim=paged_adamw_32bit, ...``."""
    return ", ".join(f"{key}={value}" for key, value in settings.items())
