"""The moment the fast path goes on a model: its first training forward.

With ``fast_path=True`` on a CUDA machine, a PEFT model whose adapters the recipe made
trains through :mod:`qlora_plugin.fastpath.kernels` (fused LoRA over NF4, a loss without
logits, Liger norms / SwiGLU / RoPE, the run's recompute mode). They are put on at the
model's first training forward: by then the trainer has finished its own setup (gradient
checkpointing, Liger's loss for TRL), which would otherwise undo them. The trigger is a
process-wide forward pre-hook (``torch-first-forward-hook`` in :mod:`qlora_plugin.core.patches`),
installed when PEFT builds one of the recipe's 4-bit LoRA layers (the ``lora_layer_built``
seam) or when a host arms its model (:func:`arm`), and removed as soon as no model waits for
it (:class:`_Pending`). What to put on is :func:`qlora_plugin.fastpath.kernel_choice.kernel_config`
for the model's run context; every choice the kernels make is kept on the model they patch.
On a machine without CUDA nothing is armed and the kernels never run
(``QLORA_FAST_PATH_ON_CPU=1`` runs their PyTorch references there, for tests).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from typing import Any

from peft import PeftModel
from torch import nn

from qlora_plugin.build.context import RunContext, attach, context_of
from qlora_plugin.build.lora_layers import context_for
from qlora_plugin.core import patches
from qlora_plugin.core.recipe import QLoRARecipe
from qlora_plugin.core.run_record import model_format
from qlora_plugin.fastpath.kernel_choice import kernel_config
from qlora_plugin.fastpath.kernels import FastPathReport, apply_fast_path
from qlora_plugin.fastpath.wording import (
    FULL_LOGITS_WARNING,
    TRL_FORWARD_PATCHES,
    describe,
    loss_description,
    loss_forward_owner,
)

PATCH = "torch-first-forward-hook"
_REQUEST = "_qlora_fast_path_request"
_DONE = "_qlora_fast_path_applied"


def arm(
    model: nn.Module | None = None,
    recipe: QLoRARecipe | None = None,
    context: RunContext | None = None,
    host_kernels: Iterable[str] = (),
    own_loss: bool = False,
) -> None:
    """Put the fast path on at the first training forward of a recipe's PEFT model.

    Without ``model``: any PEFT model whose active adapter config is a fast-path
    :class:`QLoRARecipe`. With ``model``, ``recipe`` and ``context``: that model, in that run (a
    trainer that builds its own ``LoraConfig``, as Axolotl does; the context is kept on the
    model). ``host_kernels``: names of the trainer's own LoRA kernels that are on (see
    :data:`qlora_plugin.fastpath.kernel_choice.HOST_KERNEL_LAYERS`); the layers they compute are
    left to them. ``own_loss``: the trainer reads only the model's ``loss`` in training (never
    ``logits``), so the fast path may compute it without logits; otherwise the loss stays the
    trainer's (TRL's ``chunked_nll`` and Liger's are already logit-free; ``nll``/``dft`` read
    the logits).
    """
    if model is not None:
        if context is not None:
            attach(model, context)
        model.__dict__[_REQUEST] = (recipe, tuple(host_kernels), own_loss)
        _pending.models.add(model)
    else:
        _pending.any_recipe_model = True
    _install()


def arm_for_layer(layer: Any, context: RunContext) -> None:
    """Arm the fast path when PEFT builds one of the recipe's LoRA layers on a device the fast path serves."""
    if context.fast_path_on(layer.base_layer.weight.device.type):
        _pending.layers.add(layer)
        _install()


class _Pending:
    """What the first-forward hook waits for; weak references only, so a model never trained is forgotten.

    torch offers a process-wide forward pre-hook and no hook on a model that does not
    exist yet: PEFT builds the LoRA layers (where the recipe learns it is used) before the
    trainer wraps them, and hands the layer factory no model. The hook is installed while
    something is pending and removed as soon as nothing is.
    """

    def __init__(self) -> None:
        self.layers: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self.models: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self.any_recipe_model = False

    def __bool__(self) -> bool:
        return bool(self.layers or self.models or self.any_recipe_model)

    def done(self, model: nn.Module) -> None:
        """Forget what ``model`` was waited for by."""
        self.models.discard(model)
        for module in model.modules():
            self.layers.discard(module)
        self.any_recipe_model = False


_pending = _Pending()


def _install() -> None:
    patches.apply(PATCH, lambda _: _first_forward)


def disarm() -> None:
    """Forget every pending model and remove the first-forward hook (a no-op when none is installed)."""
    _pending.layers.clear()
    _pending.models.clear()
    _pending.any_recipe_model = False
    patches.revert(PATCH)


def is_armed() -> bool:
    """True while the first-forward hook is installed."""
    return PATCH in patches.applied()


def _request(module: nn.Module) -> tuple[QLoRARecipe, RunContext, tuple[str, ...], bool] | None:
    """The (recipe, run context, host kernels, own loss) a module asks the fast path for, or None."""
    explicit = module.__dict__.get(_REQUEST)
    if explicit is not None:
        recipe, host_kernels, own_loss = explicit
        return recipe, context_of(module) or context_for(recipe), host_kernels, own_loss
    if not isinstance(module, PeftModel):
        return None
    config = module.peft_config.get(module.active_adapter)
    if isinstance(config, QLoRARecipe) and config.fast_path:
        return config, context_of(module) or context_for(config), (), False
    return None


def _first_forward(module: nn.Module, args: Any) -> None:
    if not _pending:
        patches.revert(PATCH)
        return
    if not module.training or module.__dict__.get(_DONE):
        return
    request = _request(module)
    if request is None:
        return
    _pending.done(module)
    if not _pending:
        patches.revert(PATCH)
    recipe, context, host_kernels, own_loss = request
    apply_recipe_fast_path(module, recipe, context, host_kernels=host_kernels, own_loss=own_loss)


def apply_recipe_fast_path(
    model: Any,
    recipe: QLoRARecipe,
    context: RunContext,
    *,
    host_kernels: Iterable[str] = (),
    own_loss: bool = False,
) -> FastPathReport:
    """Put the fast path of ``recipe``'s run on ``model`` (a PEFT model) now, and report it once.

    ``own_loss``: see :func:`arm`.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(base.parameters()).device.type
    forward_owner = loss_forward_owner(base)
    trl_patch = TRL_FORWARD_PATCHES.get(forward_owner or "")
    replace_trl = trl_patch is not None and patches.allowed(trl_patch)
    config = kernel_config(
        context,
        device,
        fuse_loss=(own_loss and forward_owner is None) or replace_trl,
        loss_outputs=forward_owner if replace_trl and forward_owner else "loss",
        host_kernels=host_kernels,
    )
    result = apply_fast_path(model, config=config)
    model.__dict__[_DONE] = True
    trained = model_format(base)
    context.say_once(
        logging.INFO,
        describe(
            result,
            config,
            recipe,
            loss_description(result, forward_owner, own_loss),
            tuple(host_kernels),
            trained.quant_type if trained is not None else recipe.quant_type,
        ),
    )
    if forward_owner is None and not result.loss_fused and not own_loss:
        context.say_once(logging.WARNING, FULL_LOGITS_WARNING)
    return result
