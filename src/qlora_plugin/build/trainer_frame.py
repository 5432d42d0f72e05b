"""The transformers ``Trainer`` whose ``__init__`` is running, found from the call stack.

TRL's ``SFTTrainer`` wraps the model with PEFT while its ``__init__`` runs, so the recipe's LoRA
layer factory is called from inside it. What the plugin needs from that trainer (its arguments'
``seed`` and ``max_length``, the model it was given) is read from that frame; outside a trainer's
construction there is none.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import FrameType
from typing import Any


@dataclass(frozen=True)
class TrainerBeingBuilt:
    """The arguments (``TrainingArguments``, ``SFTConfig``) and the model of a trainer under construction."""

    args: Any
    model: Any  # what the trainer's ``__init__`` holds as ``model`` now: a loaded model, or a name


def trainer_being_built() -> TrainerBeingBuilt | None:
    """The innermost transformers ``Trainer`` whose ``__init__`` is on the call stack, or None."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "__init__":
            owner = frame.f_locals.get("self")
            args = frame.f_locals.get("args")
            seed = getattr(args, "seed", None)
            if _is_trainer(owner) and isinstance(seed, int) and not isinstance(seed, bool):
                return TrainerBeingBuilt(args=args, model=frame.f_locals.get("model"))
        frame = frame.f_back
    return None


def _is_trainer(owner: Any) -> bool:
    return any(cls.__name__ == "Trainer" and cls.__module__.startswith("transformers.") for cls in type(owner).__mro__)
