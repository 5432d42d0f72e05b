"""Before a mixture-of-experts model's first training step: experts in 4 bits, and adapted as the recipe says.

Whatever loaded the model (TRL by name, a script's own ``from_pretrained``, Axolotl), its fused
experts are stored in 4 bits before the first step (one warning where that happens only now),
and a model whose experts carry no adapter while the recipe's ``lora_on_experts`` asks for them
(a recipe never resolved on the model) stops with one line and the fix
(:func:`qlora_plugin.core.experts.check_experts`). This runs at the first training forward of a
PEFT model built with the recipe (a process-wide forward pre-hook, ``torch-experts-check-hook``
in :mod:`qlora_plugin.core.patches`, installed only while such a model is pending, like the fast
path's), and in ``on_train_begin`` of :class:`ExpertsCheck` (``recipe.callbacks()``).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from peft import PeftModel
from transformers import TrainerCallback

from qlora_plugin.build.context import context_of
from qlora_plugin.build.lora_layers import context_for
from qlora_plugin.build.moe_experts import quantize_experts
from qlora_plugin.core import patches
from qlora_plugin.core.experts import check_experts

PATCH = "torch-experts-check-hook"
_pending: dict[int, weakref.ref[Any]] = {}  # recipes whose PEFT models were built and not yet checked


def prepare_experts(model: Any, recipe: Any) -> None:
    """Store ``model``'s 16-bit fused experts in 4 bits now, then refuse what would still train otherwise."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    context = context_of(model) or context_for(recipe)
    if quantize_experts(base, recipe, context=context):
        context.say_once(
            logging.WARNING,
            "qlora: the mixture-of-experts experts were in 16 bits: stored in 4 bits now, before the first step "
            "(recipe.load_model(...) stores them while loading)",
        )
    check_experts(model, recipe)


def arm(recipe: Any) -> None:
    """Check the experts at the first training forward of the PEFT model built with ``recipe``."""
    key = id(recipe)
    if key in _pending:
        return
    _pending[key] = weakref.ref(recipe, lambda _ref: _forget(key))
    patches.apply(PATCH, lambda _: _first_forward)


def _forget(key: int) -> None:
    _pending.pop(key, None)
    if not _pending:
        patches.revert(PATCH)


def _first_forward(module: Any, args: Any) -> None:
    if not module.training or not isinstance(module, PeftModel):
        return
    recipe = module.peft_config.get(module.active_adapter)
    if recipe is None or id(recipe) not in _pending or _pending[id(recipe)]() is not recipe:
        return
    _forget(id(recipe))
    prepare_experts(module, recipe)


class ExpertsCheck(TrainerCallback):
    """``on_train_begin``: :func:`prepare_experts` on the model the trainer trains."""

    def __init__(self, recipe: Any) -> None:
        self.recipe = recipe

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            prepare_experts(model, self.recipe)
