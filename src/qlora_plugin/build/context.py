"""The run context: what one run decides, made once and kept with the model, never on the recipe.

A recipe is data; a run adds decisions the recipe cannot make alone: the launch (how many
processes, this one's rank), whether FSDP or DeepSpeed ZeRO-3 shards the model, the seed the
adapters start from, the device and compute dtype, whether the fast path's kernels run, the
recompute mode, the optimizer the trainer steps with, the tuning knobs of the environment
(:class:`qlora_plugin.core.environment.Knobs`), and where its messages go (each said once).
:func:`make_context` makes it from the trainer's settings and the launch:
``recipe.sft_config()`` and the Axolotl plugin make one per run, and a recipe used alone (handed
to PEFT, asked for its settings) gets one from the launch at its first use, kept by its LoRA
layer factory (:mod:`qlora_plugin.build.lora_layers`). ``sft_config`` keeps it on the ``SFTConfig`` it
makes, so it travels with that config to the trainer (:func:`context_of_args`). Every layer
built carries it, so the PEFT model does (:func:`context_of`); a host that builds its own
layers hangs it on the model (:func:`attach`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qlora_plugin.build.distributed import (
    Launch,
    current_launch,
    deepspeed_requested,
    fsdp_requested,
    optimizer_under_fsdp,
    sharding_engine,
    zero3_requested,
)
from qlora_plugin.build.seeding import DEFAULT_SEED
from qlora_plugin.core.device import resolve_compute_dtype, training_device
from qlora_plugin.core.environment import Knobs, read_knobs
from qlora_plugin.core.hookspecs import RecipeFields

if TYPE_CHECKING:
    import torch
    from torch import nn

PACKAGE_LOGGER = "qlora_plugin"
# gradient_checkpointing -> the recompute mode: none (fastest), full (each decoder layer
# recomputed in backward), offload (as full, the kept layer inputs in pinned host memory)
RECOMPUTE: dict[bool | str, str] = {True: "full", False: "none", "offload": "offload"}
_ATTRIBUTE = "_qlora_run_context"  # on a model or LoRA layer: the run it belongs to


@dataclass
class RunContext:
    """What one run decides (module docstring); made by :func:`make_context`."""

    launch: Launch
    sharding: str | None  # "FSDP", "DeepSpeed ZeRO-3", or None
    deepspeed: bool  # DeepSpeed at any stage (it places the parameters itself)
    seed: int
    device: str  # "cuda" or "cpu"
    compute_dtype_name: str  # the recipe's compute_dtype ("auto", "bfloat16", ...)
    kernels_requested: bool  # the recipe's fast_path
    recompute: str  # "none", "full" or "offload"
    requested_optimizer: str  # the recipe's optimizer
    optimizer: str  # what the trainer steps with (torch's AdamW where the model is sharded)
    knobs: Knobs
    logger_name: str = PACKAGE_LOGGER
    said: set[str] = field(default_factory=set, repr=False, compare=False)

    @functools.cached_property
    def compute_dtype(self) -> torch.dtype:
        """The compute dtype on the run's device (resolved when first asked: a GPU without bfloat16 is an error)."""
        return resolve_compute_dtype(self.compute_dtype_name, self.device)

    @property
    def logger(self) -> logging.Logger:
        """The logger the run's messages go to (the package's, or a host's: Axolotl shows INFO only under its own)."""
        return logging.getLogger(self.logger_name)

    def say_once(self, level: int, message: str) -> None:
        """Log ``message`` the first time it comes up in this run (so once per run, not per layer)."""
        if message not in self.said:
            self.said.add(message)
            self.logger.log(level, message)

    def report(self, level: int, message: str, *args: Any) -> None:
        """Log ``message`` (with %-style ``args``) to the run's logger, every time."""
        self.logger.log(level, message, *args)

    def dtype_on(self, device: str) -> torch.dtype:
        """The compute dtype on ``device`` (the run's own, or as the recipe's ``compute_dtype`` resolves there)."""
        return self.compute_dtype if device == self.device else resolve_compute_dtype(self.compute_dtype_name, device)

    def fast_path_on(self, device: str | None = None) -> bool:
        """True when the run trains through the fast path's kernels on ``device`` (default: the run's).

        CUDA, or a CPU with ``QLORA_FAST_PATH_ON_CPU=1`` (the kernels' PyTorch references). Never
        under FSDP or DeepSpeed ZeRO-3: their sharded layers keep PEFT's forward (said once).
        """
        device = device or self.device
        serves = self.kernels_requested and (device == "cuda" or (device == "cpu" and self.knobs.fast_path_on_cpu))
        if serves and self.sharding:
            self.say_once(
                logging.INFO,
                f"qlora fast path off: {self.sharding} shards each 4-bit layer, so the layers train through PEFT's "
                "forward (the fused kernels read a layer's whole NF4 weight, gathered only around the layer's own "
                "forward)",
            )
            return False
        return serves


def make_context(
    recipe: RecipeFields,
    *,
    fsdp: bool = False,
    zero3: bool = False,
    deepspeed: bool = False,
    seed: int | None = None,
    device: str | None = None,
    logger_name: str = PACKAGE_LOGGER,
) -> RunContext:
    """The run context of ``recipe``.

    ``fsdp``, ``zero3``, ``deepspeed``: what the trainer's settings say (the launch's
    ``accelerate`` variables count too); ``seed``: the trainer's (default 42, as
    transformers'); ``device``: default the device training would use; ``logger_name``: where
    the run's messages go.
    """
    fsdp = fsdp or fsdp_requested()
    zero3 = zero3 or zero3_requested()
    sharding = sharding_engine(fsdp, zero3)
    device = device or training_device()
    context = RunContext(
        launch=current_launch(),
        sharding=sharding,
        deepspeed=deepspeed or zero3 or deepspeed_requested(),
        seed=DEFAULT_SEED if seed is None else int(seed),
        device=device,
        compute_dtype_name=recipe.compute_dtype,
        kernels_requested=bool(recipe.fast_path),
        recompute=RECOMPUTE[recipe.gradient_checkpointing],
        requested_optimizer=recipe.optimizer,
        optimizer=optimizer_under_fsdp(recipe.optimizer) if sharding else recipe.optimizer,
        knobs=read_knobs(),
        logger_name=logger_name,
    )
    for problem in context.knobs.problems:
        context.say_once(logging.WARNING, problem)
    return context


def attach(owner: Any, context: RunContext) -> None:
    """Keep ``context`` on ``owner``: a model, a LoRA layer the recipe built, or a trainer's arguments."""
    owner.__dict__[_ATTRIBUTE] = context


def context_of(model: nn.Module) -> RunContext | None:
    """The run context kept on ``model`` or on one of its modules (its LoRA layers), or None."""
    for module in model.modules():
        context = module.__dict__.get(_ATTRIBUTE)
        if context is not None:
            return context
    return None


def context_of_args(args: Any) -> RunContext | None:
    """The run context kept on a trainer's arguments (``recipe.sft_config()`` puts it there), or None."""
    return getattr(args, "__dict__", {}).get(_ATTRIBUTE)
