"""The fused paged AdamW a run may train with, in place of bitsandbytes' per-tensor one."""

from __future__ import annotations

from typing import Any

from qlora_plugin.build.context import RunContext
from qlora_plugin.fastpath.kernels import PagedAdamW
from qlora_plugin.fastpath.kernels.optim import paged_states_available

FUSED = "paged_adamw_32bit"  # the optimizer the fused one replaces


def optimizer_cls_and_kwargs(
    context: RunContext, args: Any = None, learning_rate: float | None = None
) -> tuple[type, dict[str, Any]] | None:
    """``(PagedAdamW, kwargs)`` where the run's paged AdamW 32-bit runs fused, else None.

    Same update and paged 32-bit moments as bitsandbytes' ``PagedAdamW32bit``, one
    multi-tensor step instead of a kernel and a device synchronisation per tensor. Only on the
    fast path, and on CUDA only where the paged states can be made. ``args``: a
    ``TrainingArguments`` whose learning rate, betas and eps are used; without it,
    ``learning_rate`` (the recipe's).
    """
    if not context.fast_path_on() or context.requested_optimizer != FUSED:
        return None
    if context.device == "cuda" and not paged_states_available():
        return None
    if args is None:
        return PagedAdamW, {"lr": learning_rate}
    return PagedAdamW, {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
