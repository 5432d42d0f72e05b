"""Where the recipe reaches the layers above it, one way.

A few recipe conveniences belong to higher layers (``recipe.sft_config()`` is TRL's,
``recipe.training_args()`` transformers', ``recipe.optimizer_cls_and_kwargs()`` and the
arming of the fast path are the fast path's). The core never imports those layers:
:func:`provide` fills a slot here, and the package's ``__init__`` (the public facade, above
every layer) fills each slot with a function that imports its layer when first called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SLOTS = (
    "sft_config",
    "training_args",
    "optimizer_cls_and_kwargs",
    "callbacks",
    "lora_layer_built",
    "expert_lora_layers",
    "quantize_experts",
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
