"""Where the recipe reaches the layers above it, one way.

A few recipe conveniences belong to higher layers: ``recipe.sft_config()`` is TRL's,
``recipe.training_args()`` and ``recipe.callbacks()`` transformers', ``recipe.load_model()``,
``recipe.resolve(path)``, the storage dtype of ``recipe.bnb_config()`` and the LoRA layer
factory the recipe registers with PEFT are the build layer's, ``recipe.optimizer_cls_and_kwargs()``
and the arming of the fast path when a layer is built are the fast path's. The core never
imports those layers: :func:`provide` fills a slot here, and the package's ``__init__`` (the
public facade, above every layer) fills each slot with a function that imports its layer when
first called. One slot, ``lora_layer_built``, is called by the build layer, for the fast path
above it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SLOTS = (
    "sft_config",
    "training_args",
    "optimizer_cls_and_kwargs",
    "callbacks",
    "lora_layer_factory",
    "storage_dtype",
    "meta_model",
    "load_model",
    "lora_layer_built",
)
_providers: dict[str, Callable[..., Any]] = {}


def provide(slot: str, function: Callable[..., Any]) -> None:
    """Fill ``slot`` (one of :data:`SLOTS`) with ``function``."""
    if slot not in SLOTS:
        raise ValueError(f"unknown seam {slot!r}; the seams are {list(SLOTS)}")
    _providers[slot] = function


def call(slot: str, /, *args: Any, **kwargs: Any) -> Any:
    """Call the function that fills ``slot``."""
    try:
        function = _providers[slot]
    except KeyError:
        raise RuntimeError(f"nothing provides {slot!r}: import qlora_plugin (its __init__ fills the seams)") from None
    return function(*args, **kwargs)
