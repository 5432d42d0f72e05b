"""Triton kernels: LoRA dropout with the keep-mask drawn in-kernel and kept as bits.

The three products of a LoRA adapter with dropout ``p`` on its input ``x`` [T, K]:

    u  = (x * keep) A^T / (1 - p)                  forward, [T, R]
    dA = du^T (x * keep) / (1 - p)                 backward, [R, K] in fp32
    dx += (du A) * keep / (1 - p)                  backward, in place on the base's dx

The forward draws ``keep`` with Philox from a seed held in a device tensor (drawn by
torch, so CUDA-graph replays get a new one) and stores it packed, 32 columns to an
int32 word. No dropped copy of ``x`` and no byte mask is ever written. Layout and
meaning of the bits match :mod:`qlora_plugin.fastpath.kernels.lora_dropout`, the PyTorch
reference these kernels are tested against. CUDA only: import this module only where
``_backend.use_gpu_kernels`` is true.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _draw_keep(seed, rows, k0, p, BM: tl.constexpr, BK: tl.constexpr):
    """Keep-mask [BM, BK] for columns k0.. of ``rows``: one Philox call per 4 columns."""
    groups = k0 // 4 + tl.arange(0, BK // 4)
    c0 = tl.broadcast_to(groups[None, :], (BM, BK // 4)).to(tl.int32)
    c1 = tl.broadcast_to(rows[:, None], (BM, BK // 4)).to(tl.int32)
    zero = tl.zeros((BM, BK // 4), dtype=tl.int32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    k_0 = tl.uint_to_uniform_float(r0) >= p
    k_1 = tl.uint_to_uniform_float(r1) >= p
    k_2 = tl.uint_to_uniform_float(r2) >= p
    k_3 = tl.uint_to_uniform_float(r3) >= p
    quad = tl.join(tl.join(k_0, k_1), tl.join(k_2, k_3))  # [BM, BK/4, 2, 2]: a call's 4 draws, 4 columns
    return tl.reshape(quad, (BM, BK))


@triton.jit
def _pack(keep, BM: tl.constexpr, BK: tl.constexpr):
    """[BM, BK] bools to [BM, BK/32] int32 words; column c is bit c % 32."""
    bits = tl.reshape(keep.to(tl.int32), (BM, BK // 32, 32)) << tl.arange(0, 32)[None, None, :]
    return tl.sum(bits, axis=2)


@triton.jit
def _unpack(words, BM: tl.constexpr, BK: tl.constexpr):
    """[BM, BK/32] int32 words back to a [BM, BK] 0/1 int32 mask."""
    bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(bits, (BM, BK))


@triton.jit
def _down_kernel(
    x_ptr,
    a_ptr,
    u_ptr,
    bits_ptr,
    seed_ptr,
    T,
    K,
    R,
    stride_x,
    stride_a,
    W,
    p,
    scale,
    BM: tl.constexpr,
    BK: tl.constexpr,
    BR: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    in_rows = rows < T
    rr = tl.arange(0, BR)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :],
            mask=in_rows[:, None] & (cols < K)[None, :],
            other=0.0,
        )
        keep = _draw_keep(seed, rows, k0, p, BM, BK) & (cols < K)[None, :]
        at = tl.load(
            a_ptr + rr[None, :] * stride_a + cols[:, None], mask=(rr < R)[None, :] & (cols < K)[:, None], other=0.0
        )
        acc += tl.dot(tl.where(keep, x, tl.zeros_like(x)), at)
        words = k0 // 32 + tl.arange(0, BK // 32)
        tl.store(
            bits_ptr + rows[:, None].to(tl.int64) * W + words[None, :],
            _pack(keep, BM, BK),
            mask=in_rows[:, None] & (words < W)[None, :],
        )
    tl.store(
        u_ptr + rows[:, None].to(tl.int64) * R + rr[None, :],
        (acc * scale).to(u_ptr.dtype.element_ty),
        mask=in_rows[:, None] & (rr < R)[None, :],
    )


@triton.jit
def _grad_a_kernel(
    gu_ptr,
    x_ptr,
    bits_ptr,
    out_ptr,
    T,
    K,
    R,
    stride_x,
    W,
    rows_per_split,
    scale,
    BT: tl.constexpr,
    BN: tl.constexpr,
    BR: tl.constexpr,
):
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    words = tl.program_id(0) * (BN // 32) + tl.arange(0, BN // 32)
    split = tl.program_id(1)
    rr = tl.arange(0, BR)
    acc = tl.zeros((BR, BN), dtype=tl.float32)
    start = split * rows_per_split
    for t0 in range(start, tl.minimum(start + rows_per_split, T), BT):
        rows = t0 + tl.arange(0, BT)
        in_rows = rows < T
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :],
            mask=in_rows[:, None] & (cols < K)[None, :],
            other=0.0,
        )
        w = tl.load(
            bits_ptr + rows[:, None].to(tl.int64) * W + words[None, :],
            mask=in_rows[:, None] & (words < W)[None, :],
            other=0,
        )
        gu = tl.load(
            gu_ptr + rows[:, None].to(tl.int64) * R + rr[None, :], mask=in_rows[:, None] & (rr < R)[None, :], other=0.0
        )
        acc += tl.dot(tl.trans(gu), tl.where(_unpack(w, BT, BN) != 0, x, tl.zeros_like(x)))
    tl.store(
        out_ptr + (split * R + rr[:, None]).to(tl.int64) * K + cols[None, :],
        acc * scale,
        mask=(rr < R)[:, None] & (cols < K)[None, :],
    )


@triton.jit
def _grad_x_kernel(
    gx_ptr,
    gu_ptr,
    a_ptr,
    bits_ptr,
    T,
    K,
    R,
    stride_gx,
    stride_a,
    W,
    scale,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BR: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    words = tl.program_id(1) * (BN // 32) + tl.arange(0, BN // 32)
    rr = tl.arange(0, BR)
    in_rows = rows < T
    gu = tl.load(
        gu_ptr + rows[:, None].to(tl.int64) * R + rr[None, :], mask=in_rows[:, None] & (rr < R)[None, :], other=0.0
    )
    a = tl.load(a_ptr + rr[:, None] * stride_a + cols[None, :], mask=(rr < R)[:, None] & (cols < K)[None, :], other=0.0)
    w = tl.load(
        bits_ptr + rows[:, None].to(tl.int64) * W + words[None, :],
        mask=in_rows[:, None] & (words < W)[None, :],
        other=0,
    )
    share = tl.where(_unpack(w, BM, BN) != 0, tl.dot(gu, a) * scale, 0.0)
    where = rows[:, None].to(tl.int64) * stride_gx + cols[None, :]
    inside = in_rows[:, None] & (cols < K)[None, :]
    gx = tl.load(gx_ptr + where, mask=inside, other=0.0).to(tl.float32)
    tl.store(gx_ptr + where, (gx + share).to(gx_ptr.dtype.element_ty), mask=inside)


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def dropout_down(
    x: torch.Tensor, a: torch.Tensor, p: float, seed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``u = dropout(x) @ a.T`` for ``x`` [T, K] and ``a`` [R, K]; returns ``u`` and the packed keep-mask.

    ``seed``: one int64 on ``x``'s device (default: drawn now from torch's generator).
    """
    t, k = x.shape
    r = a.shape[0]
    if seed is None:
        seed = torch.randint(0, 2**62, (1,), device=x.device, dtype=torch.int64)
    x, a = x.contiguous(), a.contiguous()
    words = triton.cdiv(k, 32)
    bits = torch.empty(t, words, dtype=torch.int32, device=x.device)
    u = torch.empty(t, r, dtype=x.dtype, device=x.device)
    bm = 64 if t >= 64 * 2 * _sm_count(x.device) else 32
    _down_kernel[(triton.cdiv(t, bm),)](
        x,
        a,
        u,
        bits,
        seed,
        t,
        k,
        r,
        x.stride(0),
        a.stride(0),
        words,
        float(p),
        1.0 / (1.0 - p),
        BM=bm,
        BK=64,
        BR=_rank_block(r),
        num_warps=4,
    )
    return u, bits


def dropout_grad_a(gu: torch.Tensor, x: torch.Tensor, bits: torch.Tensor, p: float) -> torch.Tensor:
    """``gu.T @ dropout(x)`` in fp32, [R, K], with the mask ``bits`` drawn by :func:`dropout_down`."""
    t, k = x.shape
    r = gu.shape[1]
    gu, x = gu.contiguous(), x.contiguous()
    bt, bn = 64, 128
    col_blocks = triton.cdiv(k, bn)
    splits = max(1, min(triton.cdiv(t, bt), triton.cdiv(2 * _sm_count(x.device), col_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(t, splits), bt) * bt
    splits = triton.cdiv(t, rows_per_split)
    out = torch.empty(splits, r, k, dtype=torch.float32, device=x.device)
    _grad_a_kernel[(col_blocks, splits)](
        gu,
        x,
        bits,
        out,
        t,
        k,
        r,
        x.stride(0),
        bits.shape[1],
        rows_per_split,
        1.0 / (1.0 - p),
        BT=bt,
        BN=bn,
        BR=_rank_block(r),
        num_warps=4,
    )
    return out[0] if splits == 1 else out.sum(0)


def dropout_add_grad_x(
    grad_x: torch.Tensor, gu: torch.Tensor, a: torch.Tensor, bits: torch.Tensor, p: float
) -> torch.Tensor:
    """``grad_x += (gu @ a) * keep / (1 - p)`` in place (``grad_x`` [T, K], row-contiguous)."""
    t, k = grad_x.shape
    r = gu.shape[1]
    gu, a = gu.contiguous(), a.contiguous()
    bm, bn = 64, 128
    _grad_x_kernel[(triton.cdiv(t, bm), triton.cdiv(k, bn))](
        grad_x,
        gu,
        a,
        bits,
        t,
        k,
        r,
        grad_x.stride(0),
        a.stride(0),
        bits.shape[1],
        1.0 / (1.0 - p),
        BM=bm,
        BN=bn,
        BR=_rank_block(r),
        num_warps=4,
    )
    return grad_x
