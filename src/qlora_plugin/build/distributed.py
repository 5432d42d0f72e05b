"""Multi-process launches as a run sees them: which rank, which device, whether FSDP or ZeRO-3 shards the model.

The launchers are the existing engines (``accelerate launch``, ``torchrun``, Axolotl's
multi-GPU configs); this module only reads what they set. Under DDP each rank needs the
whole 4-bit model on its own GPU (bitsandbytes weights cannot be moved by accelerate
afterwards: "You can't train a model that has been loaded in 8-bit or 4-bit precision on
a different device"); under FSDP the packed 4-bit weights must be stored in the dtype of
the other parameters, or FSDP refuses to shard them ("Cannot flatten integer dtype tensors").
DeepSpeed ZeRO-3 partitions every parameter too, and is treated the same way
(:func:`sharding_engine`). What a run makes of all this is decided once, in its run
context (:func:`qlora_plugin.build.context.make_context`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qlora_plugin.core.patches import allowed

FSDP_ENV = "ACCELERATE_USE_FSDP"  # set by `accelerate launch` with an FSDP config, and by Axolotl
DEEPSPEED_ENV = "ACCELERATE_USE_DEEPSPEED"  # set by `accelerate launch` with a DeepSpeed config
ZERO_STAGE_ENV = "ACCELERATE_DEEPSPEED_ZERO_STAGE"  # ... with its `zero_stage`
DEEPSPEED_CONFIG_ENV = "ACCELERATE_DEEPSPEED_CONFIG_FILE"  # ... or with its `deepspeed_config_file`
FSDP_NAME = "FSDP"
ZERO3_NAME = "DeepSpeed ZeRO-3"


@dataclass(frozen=True)
class Launch:
    """The process group this process belongs to (one process: world size 1, rank 0)."""

    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1


def current_launch() -> Launch:
    """This process's launch: from accelerate's state where it already exists, else the launcher's env.

    ``accelerate launch`` and ``torchrun`` set ``WORLD_SIZE`` and ``LOCAL_RANK``; reading them
    (rather than creating accelerate's ``PartialState``) starts no process group early.
    """
    if allowed("accelerate-partial-state"):
        from accelerate.state import PartialState

        if PartialState._shared_state:  # already initialised by a trainer or the user
            state = PartialState()
            return Launch(int(state.num_processes), int(state.local_process_index))
    return Launch(_env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))


def rank_device_map(device: str, launch: Launch | None = None) -> dict[str, Any] | None:
    """The ``device_map`` that puts the whole model on this rank's device, or None where none is needed.

    CUDA under a multi-process launch: ``{"": local_rank}`` (without it, "auto" spreads one
    model over every GPU and a 4-bit model cannot be moved afterwards). On a CPU every rank
    loads on the CPU anyway, and one process keeps the loader's own default.
    """
    launch = launch or current_launch()
    if device == "cuda" and launch.distributed:
        return {"": launch.local_rank}
    return None


def deepspeed_requested(settings: Mapping[str, Any] | None = None) -> bool:
    """True when the trainer's settings (``deepspeed``) or the launch (``ACCELERATE_USE_DEEPSPEED``) say DeepSpeed.

    DeepSpeed places the parameters itself (transformers refuses a ``device_map`` under ZeRO-3).
    """
    return _truthy(os.environ.get(DEEPSPEED_ENV, "")) or bool(settings and settings.get("deepspeed"))


def deepspeed_zero_stage(settings: Mapping[str, Any] | None = None) -> int | None:
    """The ZeRO stage DeepSpeed runs at, or None where no DeepSpeed stage can be read.

    ``settings``: the trainer's settings or an Axolotl config; their ``deepspeed`` is a
    DeepSpeed config (a dict, or the path of its JSON file). Else the launch:
    ``accelerate launch`` with a DeepSpeed config sets ``ACCELERATE_DEEPSPEED_ZERO_STAGE``
    (its ``zero_stage``) or ``ACCELERATE_DEEPSPEED_CONFIG_FILE``.
    """
    config = settings.get("deepspeed") if settings else None
    if config:
        return _stage_of(config)
    if not _truthy(os.environ.get(DEEPSPEED_ENV, "")):
        return None
    stage = os.environ.get(ZERO_STAGE_ENV, "").strip()
    if stage.isdigit():
        return int(stage)
    path = os.environ.get(DEEPSPEED_CONFIG_ENV, "")
    return _stage_of(path) if path else None


def zero3_requested(settings: Mapping[str, Any] | None = None) -> bool:
    """True when the settings or the launch say DeepSpeed ZeRO-3 (:func:`deepspeed_zero_stage`)."""
    return deepspeed_zero_stage(settings) == 3


def fsdp_requested(settings: Mapping[str, Any] | None = None) -> bool:
    """True when the trainer's settings or the launch say FSDP.

    ``settings``: ``TrainingArguments``/``SFTConfig`` keyword arguments (FSDP is on when ``fsdp``
    is). The launch: ``ACCELERATE_USE_FSDP`` (``accelerate launch`` with an FSDP config file sets it).
    """
    if _truthy(os.environ.get(FSDP_ENV, "")):
        return True
    if not settings:
        return False
    return settings.get("fsdp") not in (None, False, "", [], ())


def sharding_engine(fsdp: bool, zero3: bool) -> str | None:
    """``"FSDP"`` or ``"DeepSpeed ZeRO-3"`` where one partitions the model across ranks, else None.

    Both engines split each parameter between the ranks and gather it around a module's
    forward, so a run adapts to them alike: 4-bit weights stored in the compute dtype,
    the fast path's fused kernels off, torch's AdamW.
    """
    if fsdp:
        return FSDP_NAME
    if zero3:
        return ZERO3_NAME
    return None


FSDP_OPTIMIZER = "adamw_torch"


def optimizer_under_fsdp(optimizer: str) -> str:
    """The optimizer a recipe trains with when FSDP or DeepSpeed ZeRO-3 shards the model.

    bitsandbytes' optimizers (paged, 8-bit, 32-bit) cannot update FSDP2's sharded (DTensor)
    parameters: the first step fails with "Operator bitsandbytes.optimizer_update_32bit.default
    does not have a sharding strategy registered". torch's AdamW does the same update with
    32-bit states, sharded with the parameters, so nothing needs paging. Under ZeRO-3 the
    trainer's optimizer steps DeepSpeed's flat fp32 partitions of the adapters: the fast
    path's fused paged AdamW does not apply (the fast path is off), and torch's AdamW is one
    of the optimizers DeepSpeed tests ZeRO with. Others stay.
    """
    name = optimizer.lower()
    from_bitsandbytes = name.startswith("paged_") or "bnb" in name or name.endswith(("8bit", "32bit"))
    return FSDP_OPTIMIZER if from_bitsandbytes else optimizer


def _stage_of(config: Any) -> int | None:
    """``zero_optimization.stage`` of a DeepSpeed config (a dict or a JSON file), None where it has none."""
    if isinstance(config, (str, os.PathLike)):
        try:
            with open(config, encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, ValueError):
            return None
    stage = config.get("zero_optimization", {}).get("stage") if isinstance(config, Mapping) else None
    return stage if isinstance(stage, int) and not isinstance(stage, bool) else None


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")
