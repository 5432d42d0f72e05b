"""The one table from a recipe and its run context to a trainer's settings.

Each row names the setting as transformers' ``TrainingArguments`` (and TRL's configs) call it
and as Axolotl's config does, and says how its value follows from the recipe and the run.
:func:`qlora_plugin.integrations.transformers.training_args` and
:func:`qlora_plugin.integrations.axolotl.expand.native_keys` both read it, so the two trainers
cannot drift apart.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qlora_plugin.build.context import RunContext
from qlora_plugin.core.device import precision_flags
from qlora_plugin.core.hookspecs import RecipeFields

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Run:
    """What a setting's value is read from: the recipe, its run, and the device and compute dtype in question."""

    recipe: RecipeFields
    context: RunContext
    device: str
    compute_dtype: torch.dtype


@dataclass(frozen=True)
class Setting:
    """One trainer setting: its transformers name, its Axolotl key, its value for a run.

    ``optional``: left out where the value is None (the trainer's own default applies).
    """

    transformers: str
    axolotl: str
    value: Callable[[Run], Any]
    optional: bool = False


def _recomputes(run: Run) -> bool:
    return run.context.recompute != "none"  # "offload" is recompute too (the fast path's, on CUDA)


def _precision(flag: str) -> Callable[[Run], bool]:
    return lambda run: precision_flags(run.compute_dtype, run.device)[flag]


SETTINGS: tuple[Setting, ...] = (
    Setting("optim", "optimizer", lambda run: run.context.optimizer),
    Setting("learning_rate", "learning_rate", lambda run: run.recipe.learning_rate),
    Setting("max_grad_norm", "max_grad_norm", lambda run: run.recipe.max_grad_norm),
    Setting("lr_scheduler_type", "lr_scheduler", lambda run: run.recipe.lr_scheduler_type),
    # transformers 5 folded warmup_ratio into warmup_steps: a float below 1 is a ratio
    Setting("warmup_steps", "warmup_ratio", lambda run: run.recipe.warmup_ratio),
    Setting("gradient_checkpointing", "gradient_checkpointing", _recomputes),
    Setting(
        "gradient_checkpointing_kwargs",
        "gradient_checkpointing_kwargs",
        lambda run: {"use_reentrant": False} if _recomputes(run) else None,
    ),
    Setting("bf16", "bf16", _precision("bf16")),
    Setting("fp16", "fp16", _precision("fp16")),
    Setting("num_train_epochs", "num_epochs", lambda run: run.recipe.num_train_epochs, optional=True),
    Setting(
        "per_device_train_batch_size",
        "micro_batch_size",
        lambda run: run.recipe.per_device_train_batch_size,
        optional=True,
    ),
    Setting(
        "gradient_accumulation_steps",
        "gradient_accumulation_steps",
        lambda run: run.recipe.gradient_accumulation_steps,
        optional=True,
    ),
)

# Trainer settings of the fast path; each removes a point where the host waits for the GPU,
# after which the GPU idles while the host prepares the next step (docs/performance.md):
# - Trainer's NaN/Inf loss filter reads each step's loss back just after the backward is
#   queued. It only changes what is logged: a NaN or Inf loss is logged as such instead of
#   being replaced by the running average.
# - The batch's copy to the GPU: from pinned memory (Trainer's default) but blocking, it
#   waits for the previous step's backward and optimizer step. ``non_blocking`` lets it
#   queue behind them.
# Axolotl has no key for either: its plugin sets them on the trainer it built.
FAST_TRAINER_SETTINGS: dict[str, Any] = {"logging_nan_inf_filter": False, "accelerator_config": {"non_blocking": True}}


def run_of(recipe: RecipeFields, context: RunContext, device: str | None = None) -> Run:
    """The :class:`Run` of ``recipe`` in ``context``, on ``device`` (default: the run's own)."""
    device = device or context.device
    return Run(recipe, context, device, context.dtype_on(device))


def settings_for(run: Run, naming: str) -> dict[str, Any]:
    """Every setting of :data:`SETTINGS` for ``run``, named as ``naming`` says (``"transformers"`` or ``"axolotl"``)."""
    settings: dict[str, Any] = {}
    for setting in SETTINGS:
        value = setting.value(run)
        if value is None and setting.optional:
            continue
        settings[getattr(setting, naming)] = value
    return settings


def fast_trainer_settings(context: RunContext, device: str | None = None) -> dict[str, Any]:
    """The ``TrainingArguments`` fields the fast path sets on ``device`` (none off the fast path)."""
    return copy.deepcopy(FAST_TRAINER_SETTINGS) if context.fast_path_on(device) else {}
