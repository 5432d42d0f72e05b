"""A trainer's ``max_length`` against the positions its model has, checked once per trainer config.

Run where the trainer is built: from the recipe's LoRA layer factory while TRL's ``SFTTrainer``
wraps the model (any ``SFTConfig``, with or without ``recipe.callbacks()``), and again by the
checkpoint callback's ``on_init_end`` for trainers whose model was wrapped before (the arguments
remember that they were checked). A learned position table is refused before the first step (a
longer row fails inside the model with an index error); a rotary model gets one warning.
"""

from __future__ import annotations

import logging
from typing import Any

from qlora_plugin.core.model_limits import check_sequence_length

_CHECKED = "_qlora_max_length_checked"


def check_max_length(args: Any, model: Any, logger: logging.Logger) -> None:
    """Compare ``args.max_length`` with ``model``'s positions once per ``args``: raise, warn to ``logger``, or pass.

    ``model``: a transformers model, a PEFT model or anything else (a name: nothing to compare yet).
    """
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if args is None or not callable(to_dict) or getattr(args, "__dict__", {}).get(_CHECKED):
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    warning = check_sequence_length(getattr(args, "max_length", None), "max_length", to_dict(), type(base).__name__)
    args.__dict__[_CHECKED] = True
    if warning:
        logger.warning("qlora: %s", warning)
