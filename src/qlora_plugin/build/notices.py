"""Which optimizer the trainer really runs, said once at its first step over the recipe's layers.

A trainer may take its optimizer from arguments the recipe did not make (``optimizers=``,
``optim=``); the first step is where that shows. torch offers only a process-wide step
hook (:mod:`qlora_plugin.core.patches`, ``torch-optimizer-step-hook``); it stays installed
and looks at each optimizer once (removing it from inside itself would break torch's loop
over the global hooks whenever another library has registered one too). The layers it
watches are held weakly, each with its run context, so a model never trained is forgotten.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from bitsandbytes.optim.optimizer import Optimizer2State
from torch import nn

from qlora_plugin.build.context import RunContext, attach, context_of
from qlora_plugin.core import patches

PATCH = "torch-optimizer-step-hook"
_seen_optimizers: weakref.WeakSet[Any] = weakref.WeakSet()
_watched_layers: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """The trainer's name for ``optimizer`` (``paged_adamw_32bit``, ...), or its class name."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    if isinstance(optimizer, Optimizer2State) and optimizer.optimizer_name == "adam":
        bnb_args: Any = optimizer.args  # bitsandbytes' MockArgs: attributes set from a dict
        paged = "paged_" if optimizer.is_paged else ""
        return f"{paged}adamw_{bnb_args.optim_bits}bit"
    if type(optimizer).__module__ == "qlora_plugin.fastpath.kernels.optim":
        return "paged_adamw_32bit" if getattr(optimizer, "paged_requested", False) else "adamw_torch"
    if type(optimizer).__module__.startswith("torch.optim") and type(optimizer).__name__ == "AdamW":
        return "adamw_torch"
    return type(optimizer).__name__


def watch_optimizer(layer: nn.Module, context: RunContext) -> None:
    """Report, at the first optimizer step over ``layer``'s adapters, which optimizer runs.

    The layer is remembered, not its parameters: PEFT may replace the parameter objects after
    the layer is built (its adapter dtype cast does since 0.21.1).
    """
    attach(layer, context)
    _watched_layers.add(layer)
    patches.apply(PATCH, lambda _: _report_optimizer)


def _context_of_step(optimizer: torch.optim.Optimizer) -> RunContext | None:
    """The run context of a watched LoRA layer whose adapter weights ``optimizer`` updates, or None."""
    updated = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for layer in list(_watched_layers):
        if any(id(p) in updated for name, p in layer.named_parameters() if "lora_" in name):
            return context_of(layer)
    return None


def _on_cuda(optimizer: torch.optim.Optimizer) -> bool:
    return any(p.is_cuda for group in optimizer.param_groups for p in group["params"])


def _report_optimizer(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if optimizer in _seen_optimizers:
        return
    _seen_optimizers.add(optimizer)
    context = _context_of_step(optimizer)
    if context is None:
        return
    used = describe_optimizer(optimizer)
    asked = context.requested_optimizer
    inner = getattr(optimizer, "optimizer", optimizer)
    if used == asked and type(inner).__module__.startswith("bitsandbytes") and _on_cuda(inner):
        context.say_once(
            logging.INFO,
            f"optimizer: {used} (bitsandbytes), as the recipe asks. It steps one tensor at a time with a device "
            "synchronisation after each; for the same update as one fused step pass "
            "optimizer_cls_and_kwargs=recipe.optimizer_cls_and_kwargs(args) to the trainer",
        )
    elif used == asked and type(inner).__module__ == "qlora_plugin.fastpath.kernels.optim":
        context.say_once(logging.INFO, f"optimizer: {used}, fused (one multi-tensor step), as the recipe asks")
    elif used == asked:
        context.say_once(logging.INFO, f"optimizer: {used}, as the recipe asks")
    elif context.sharding and used == context.optimizer:
        context.say_once(logging.INFO, f"optimizer: {used}, the recipe's choice under {context.sharding}")
    else:
        context.say_once(
            logging.WARNING,
            f"optimizer: the trainer runs {used}, not the recipe's {asked}: it came from the "
            "trainer's own arguments. Pass args=recipe.sft_config(...) and no `optimizers=` to use it.",
        )
