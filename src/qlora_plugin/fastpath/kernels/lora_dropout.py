"""LoRA dropout kept as a bit-packed keep-mask: the PyTorch reference and the switch.

A LoRA adapter with dropout ``p`` uses ``x_d = x * keep / (1 - p)`` three times: for
``u = x_d A^T`` in the forward, for ``dA = du^T x_d`` and for the input gradient's share
``(du A) * keep / (1 - p)``. PyTorch's dropout saves ``x_d`` and a byte mask for that,
3 bytes per input element and layer (q, k and v each draw their own mask over one
input). On CUDA, :mod:`qlora_plugin.fastpath.kernels.triton_lora_dropout` instead draws the mask
inside the forward's kernel, saves it as bits (column ``c`` of a row is bit ``c % 32``
of int32 word ``c // 32``) and reads ``x`` and the bits in the backward: 1/8 byte per
element. The functions here compute the same three products from the same bits in
plain PyTorch; the kernels are tested against them.
"""

from __future__ import annotations

import torch

from qlora_plugin.fastpath.kernels._backend import use_gpu_kernels


def use_triton_dropout(x: torch.Tensor, enabled: bool = True) -> bool:
    """True when the bit-mask kernels serve ``x`` (CUDA, Triton, 16-bit) and the model's choice ``enabled`` allows."""
    return enabled and x.dtype in (torch.bfloat16, torch.float16) and use_gpu_kernels(x)


def pack_keep_mask(keep: torch.Tensor) -> torch.Tensor:
    """[T, K] bools to [T, ceil(K / 32)] int32 words, column ``c`` as bit ``c % 32``."""
    t, k = keep.shape
    words = (k + 31) // 32
    padded = torch.zeros(t, words * 32, dtype=torch.int64, device=keep.device)
    padded[:, :k] = keep
    packed = (padded.view(t, words, 32) << torch.arange(32, device=keep.device)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_keep_mask(bits: torch.Tensor, k: int) -> torch.Tensor:
    """The [T, k] bool keep-mask held in ``bits`` (see :func:`pack_keep_mask`)."""
    words = bits.to(torch.int64) & 0xFFFFFFFF
    unpacked = (words.unsqueeze(-1) >> torch.arange(32, device=bits.device)) & 1
    return unpacked.reshape(bits.shape[0], -1)[:, :k].bool()


def dropout_down_reference(
    x: torch.Tensor, a: torch.Tensor, p: float, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``u = (x * keep / (1 - p)) @ a.T`` in ``x``'s dtype and the packed ``keep`` (drawn if not given)."""
    if keep is None:
        keep = torch.rand(x.shape, device=x.device) >= p
    u = (x * keep).float() @ a.float().t() / (1.0 - p)
    return u.to(x.dtype), pack_keep_mask(keep)


def dropout_grad_a_reference(gu: torch.Tensor, x: torch.Tensor, bits: torch.Tensor, p: float) -> torch.Tensor:
    """``gu.T @ (x * keep / (1 - p))`` in fp32, [R, K]."""
    keep = unpack_keep_mask(bits, x.shape[1])
    return gu.float().t() @ (x * keep).float() / (1.0 - p)


def dropout_add_grad_x_reference(
    grad_x: torch.Tensor, gu: torch.Tensor, a: torch.Tensor, bits: torch.Tensor, p: float
) -> torch.Tensor:
    """``grad_x += (gu @ a) * keep / (1 - p)`` in place."""
    keep = unpack_keep_mask(bits, grad_x.shape[1])
    share = (gu.float() @ a.float()) * keep / (1.0 - p)
    return grad_x.copy_(grad_x.float() + share)
