"""Plain, once-only reports of which parts of a recipe are in effect.

Messages go to the ``qlora_plugin`` logger, or to the logger a host tool routes one
recipe's messages to (:func:`route_messages`: Axolotl shows INFO only under its own
namespace). The choice is kept on the recipe, so runs in one process never redirect
each other's messages.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from qlora_plugin.core.fields import RecipeSpec
    from qlora_plugin.core.recipe import QLoRARecipe

PACKAGE_LOGGER = "qlora_plugin"
_LOGGER_ATTR = "_qlora_logger"
_hook_handle: Any = None
_seen_optimizers: weakref.WeakSet[Any] = weakref.WeakSet()
_watched_layers: weakref.WeakKeyDictionary[Any, QLoRARecipe] = weakref.WeakKeyDictionary()


def route_messages(recipe: Any, logger_name: str) -> None:
    """Send the messages about ``recipe`` (and the run it drives) to the logger ``logger_name``."""
    recipe.__dict__[_LOGGER_ATTR] = logger_name


def logger_for(recipe: Any = None) -> logging.Logger:
    """The logger that messages about ``recipe`` go to (the package's, unless routed elsewhere)."""
    name = recipe.__dict__.get(_LOGGER_ATTR, PACKAGE_LOGGER) if recipe is not None else PACKAGE_LOGGER
    return logging.getLogger(name)


def report(level: int, message: str, *args: Any, recipe: Any = None) -> None:
    """Log ``message`` to the logger of ``recipe`` (see :func:`logger_for`)."""
    logger_for(recipe).log(level, message, *args)


def log_once(level: int, message: str, recipe: QLoRARecipe | RecipeSpec) -> None:
    """Log ``message`` the first time it comes up for ``recipe`` (so once per run, not per layer)."""
    said = recipe.__dict__.setdefault("_qlora_said", set())
    if message not in said:
        said.add(message)
        logger_for(recipe).log(level, message)


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """The trainer's name for ``optimizer`` (``paged_adamw_32bit``, ...), or its class name."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    try:
        from bitsandbytes.optim.optimizer import Optimizer2State
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        pass
    else:
        if isinstance(optimizer, Optimizer2State) and optimizer.optimizer_name == "adam":
            bnb_args: Any = optimizer.args  # bitsandbytes' MockArgs: attributes set from a dict
            paged = "paged_" if optimizer.is_paged else ""
            return f"{paged}adamw_{bnb_args.optim_bits}bit"
    if type(optimizer).__module__ == "qlora_plugin.fastpath.kernels.optim":
        return "paged_adamw_32bit" if getattr(optimizer, "paged_requested", False) else "adamw_torch"
    if type(optimizer).__module__.startswith("torch.optim") and type(optimizer).__name__ == "AdamW":
        return "adamw_torch"
    return type(optimizer).__name__


def watch_optimizer(layer: nn.Module, recipe: QLoRARecipe) -> None:
    """Report, at the first optimizer step over ``layer``'s adapters, which optimizer runs.

    A trainer may take its optimizer from arguments the recipe did not make
    (``optimizers=``, ``optim=``); the first step is where that shows. The layer is
    remembered, not its parameters: PEFT may replace the parameter objects after the
    layer is built (its adapter dtype cast does since 0.21.1). torch offers only a
    process-wide step hook; it stays installed and looks at each optimizer once
    (removing it from inside itself would break torch's loop over the global hooks
    whenever another library has registered one too).
    """
    global _hook_handle
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    _watched_layers[layer] = recipe
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_pre_hook(_report_optimizer)


def recipe_of_model(model: nn.Module) -> QLoRARecipe | None:
    """The recipe that built one of ``model``'s LoRA layers, or None for a model it did not build."""
    for module in model.modules():
        recipe = _watched_layers.get(module)
        if recipe is not None:
            return recipe
    return None


def _recipe_of(optimizer: torch.optim.Optimizer) -> QLoRARecipe | None:
    """The recipe of a watched LoRA layer whose adapter weights ``optimizer`` updates, or None."""
    updated = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for layer, recipe in list(_watched_layers.items()):
        if any(id(p) in updated for name, p in layer.named_parameters() if "lora_" in name):
            return recipe
    return None


def _on_cuda(optimizer: torch.optim.Optimizer) -> bool:
    return any(p.is_cuda for group in optimizer.param_groups for p in group["params"])


def _optimizer_under_fsdp(recipe: QLoRARecipe) -> str | None:
    """What the recipe's trainer settings name under FSDP or ZeRO-3, where they differ from ``recipe.optimizer``."""
    from qlora_plugin.core.distributed import optimizer_under_fsdp, sharding_engine

    return optimizer_under_fsdp(recipe.optimizer) if sharding_engine(recipe) else None


def _report_optimizer(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if optimizer in _seen_optimizers:
        return
    _seen_optimizers.add(optimizer)
    recipe = _recipe_of(optimizer)
    if recipe is None:
        return
    used = describe_optimizer(optimizer)
    inner = getattr(optimizer, "optimizer", optimizer)
    if used == recipe.optimizer and type(inner).__module__.startswith("bitsandbytes") and _on_cuda(inner):
        log_once(
            logging.INFO,
            f"optimizer: {used} (bitsandbytes), as the recipe asks. It steps one tensor at a time with a device "
            "synchronisation after each; for the same update as one fused step pass "
            "optimizer_cls_and_kwargs=recipe.optimizer_cls_and_kwargs(args) to the trainer",
            recipe,
        )
    elif used == recipe.optimizer and type(inner).__module__ == "qlora_plugin.fastpath.kernels.optim":
        log_once(logging.INFO, f"optimizer: {used}, fused (one multi-tensor step), as the recipe asks", recipe)
    elif used == recipe.optimizer:
        log_once(logging.INFO, f"optimizer: {used}, as the recipe asks", recipe)
    elif used == _optimizer_under_fsdp(recipe):
        from qlora_plugin.core.distributed import sharding_engine

        log_once(logging.INFO, f"optimizer: {used}, the recipe's choice under {sharding_engine(recipe)}", recipe)
    else:
        log_once(
            logging.WARNING,
            f"optimizer: the trainer runs {used}, not the recipe's {recipe.optimizer}: it came from the "
            "trainer's own arguments. Pass args=recipe.sft_config(...) and no `optimizers=` to use it.",
            recipe,
        )
