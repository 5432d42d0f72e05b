"""Paged AdamW with 32-bit states whose step runs as a few multi-tensor kernels.

Same update as bitsandbytes' ``PagedAdamW32bit`` (decoupled weight decay, bias-corrected
moments, fp32 ``exp_avg``/``exp_avg_sq``) and the same paging: the moments live in
CUDA unified memory allocated by bitsandbytes, which the driver may move to host memory
when the GPU runs short and which is prefetched back before each step. What differs is
the step itself: bitsandbytes launches one kernel per parameter and synchronises the
device after each; here all moments sit in one unified-memory buffer and the update is
PyTorch's fused multi-tensor AdamW (a handful of launches, no synchronisation).

Off CUDA the moments are ordinary tensors and the step is PyTorch's foreach AdamW, the
reference path the CPU tests use.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from typing import Any

import torch

from qlora_plugin.core.patches import c_function


class _ManagedArray:
    """Exposes a unified-memory pointer through ``__cuda_array_interface__`` for torch.as_tensor."""

    def __init__(self, ptr: int, numel: int) -> None:
        self.ptr = ptr
        self.__cuda_array_interface__ = {
            "shape": (numel,),
            "typestr": "<f4",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }


def managed_zeros(numel: int, device: torch.device) -> torch.Tensor:
    """A 1-D fp32 CUDA tensor of ``numel`` zeros in unified (pageable-to-host) memory.

    Allocated with bitsandbytes' ``cget_managed_ptr`` (``cudaMallocManaged``), like the
    states of its paged optimizers; never freed, as there.
    """
    get_managed_ptr = managed_memory_functions()[0]
    ptr = get_managed_ptr(ctypes.c_size_t(numel * 4))
    if not ptr:
        raise RuntimeError("cudaMallocManaged failed")
    t = torch.as_tensor(_ManagedArray(int(ptr), numel), device=device)
    t.zero_()
    return t


def managed_memory_functions() -> tuple[Any, Any]:
    """bitsandbytes' ``cget_managed_ptr`` and ``cprefetch``, checked against the declarations this code relies on.

    Raises RuntimeError where they are missing, declared otherwise, or bitsandbytes is
    outside the tested versions (see :mod:`qlora_plugin.core.patches`);
    :func:`paged_states_available` asks first.
    """
    get_managed_ptr = c_function("bnb-managed-memory-c-calls", "cget_managed_ptr", None, ctypes.c_void_p)
    prefetch = c_function("bnb-managed-memory-c-calls", "cprefetch", None)
    if get_managed_ptr is None or prefetch is None:
        raise RuntimeError("bitsandbytes' managed-memory functions are not usable here")
    return get_managed_ptr, prefetch


def paged_states_available() -> bool:
    """True where :class:`PagedAdamW` can page its moments through bitsandbytes on this install."""
    try:
        managed_memory_functions()
    except RuntimeError:
        return False
    return True


def prefetch_to_device(t: torch.Tensor) -> None:
    """Ask the driver to move a unified-memory tensor's pages to its GPU (asynchronous)."""
    managed_memory_functions()[1](
        ctypes.c_void_p(t.data_ptr()),
        ctypes.c_size_t(t.numel() * t.element_size()),
        ctypes.c_int32(t.device.index or 0),
    )


class PagedAdamW(torch.optim.AdamW):
    """AdamW with fp32 moments in paged (unified) memory and a fused multi-tensor step.

    Parameters must be fp32 on CUDA for the paged, fused path by the first step (keep
    LoRA master weights in fp32 and compute in bf16, as ``apply_fast_path`` does; a
    trainer may build the optimizer before that cast); on CPU any float dtype works.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        paged: bool = True,
    ) -> None:
        params = list(params)
        tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
        on_cuda = bool(tensors) and all(p.is_cuda for p in tensors)
        if on_cuda:
            super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        else:
            super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True)
        self.paged_requested = paged  # off CUDA the moments fall back to ordinary memory, as bitsandbytes' do
        self.paged = paged and on_cuda
        self._pages: torch.Tensor | None = None

    def _page_states(self) -> None:
        """Place every parameter's moments in one unified-memory buffer (keeping any values)."""
        params = [p for g in self.param_groups for p in g["params"]]
        if any(p.dtype != torch.float32 for p in params):
            raise ValueError(
                "PagedAdamW keeps 32-bit moments only for fp32 parameters; keep LoRA master weights in fp32"
            )
        pages = managed_zeros(2 * sum(p.numel() for p in params), params[0].device)
        offset = 0
        for p in params:
            state = self.state[p]
            n = p.numel()
            for key in ("exp_avg", "exp_avg_sq"):
                view = pages[offset : offset + n].view_as(p)
                offset += n
                if key in state:
                    view.copy_(state[key])
                state[key] = view
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        self._pages = pages

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if self.paged:
            if self._pages is None:
                self._page_states()
            else:
                prefetch_to_device(self._pages)
        return super().step(closure)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.paged:
            self._pages = None  # re-paged, values kept, at the next step (accelerate loads before any cast)

    def paged_bytes(self) -> int:
        """Bytes of moments held in unified memory (0 before the first step or off CUDA)."""
        return 0 if self._pages is None else self._pages.numel() * 4
