"""Triton kernel: one pass of cross-entropy over a chunk of logits, with TRL's statistics.

For each row ``z`` [V] of a chunk of logits and its target ``y``, the kernel computes, in float32:

    lse      = log sum_j exp(z_j)
    loss     = lse - z_y
    entropy  = lse - sum_j softmax(z)_j z_j          (Shannon entropy of the row's distribution)
    correct  = argmax_j z_j == y                      (first index of the maximum, as torch.argmax)

then overwrites the row with the loss's gradient, ``(softmax(z) - onehot(y)) * scale``, in the
logits' own dtype. Rows whose target is ``ignore_index`` get zeros everywhere. The first pass
keeps a running maximum and rescales its two sums (online softmax), so each row is read twice
and written once, and nothing the size of the chunk is allocated. ``scale`` is read from a
device tensor (one over the number of counted tokens), so no value is read back to the host.
The PyTorch reference is :func:`qlora_plugin.fastpath.kernels.loss_stats.row_stats_reference`.
CUDA only: import this module only where ``_backend.use_gpu_kernels`` is true (or under
Triton's interpreter, in tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # columns per iteration: 128,256 logits of a Llama-3 row in 32 steps


@triton.jit
def _row_stats_grad_kernel(
    logits_ptr,
    row_stride,
    targets_ptr,
    scale_ptr,
    loss_ptr,
    entropy_ptr,
    correct_ptr,
    n_cols,
    ignore_index,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index

    running_max = tl.full((), float("-inf"), tl.float32)
    exp_sum = tl.zeros((), tl.float32)  # sum of exp(z - running_max)
    weighted_sum = tl.zeros((), tl.float32)  # sum of exp(z - running_max) * z
    best = tl.full((), float("-inf"), tl.float32)
    best_index = tl.zeros((), tl.int64)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < n_cols
        z = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32)
        block_max = tl.max(z, axis=0)
        block_arg = tl.argmax(z, axis=0, tie_break_left=True).to(tl.int64) + start
        best_index = tl.where(block_max > best, block_arg, best_index)
        best = tl.maximum(best, block_max)
        new_max = tl.maximum(running_max, block_max)
        rescale = tl.exp(running_max - new_max)
        e = tl.where(inside, tl.exp(z - new_max), 0.0)
        exp_sum = exp_sum * rescale + tl.sum(e, axis=0)
        weighted_sum = weighted_sum * rescale + tl.sum(e * tl.where(inside, z, 0.0), axis=0)
        running_max = new_max
    lse = running_max + tl.log(exp_sum)
    target_logit = tl.load(base + target, mask=valid, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target_logit, 0.0))
    tl.store(entropy_ptr + row, tl.where(valid, lse - weighted_sum / exp_sum, 0.0))
    tl.store(correct_ptr + row, tl.where(valid & (best_index == target), 1.0, 0.0))

    scale = tl.load(scale_ptr).to(tl.float32)
    scale = tl.where(valid, scale, 0.0)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < n_cols
        z = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
        p = tl.exp(z - lse)
        grad = tl.where(cols == target, p - 1.0, p) * scale
        tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=inside)


def row_stats_and_grad_(
    logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (loss, entropy, correct) in float32; ``logits`` [N, V] is overwritten with the loss's gradient.

    ``scale``: a one-element float tensor on the logits' device multiplying every gradient row.
    """
    rows, cols = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("row_stats_and_grad_ needs rows laid out contiguously")
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(loss)
    correct = torch.empty_like(loss)
    if rows:
        _row_stats_grad_kernel[(rows,)](
            logits,
            logits.stride(0),
            targets,
            scale,
            loss,
            entropy,
            correct,
            cols,
            ignore_index,
            BLOCK=BLOCK,
            num_warps=16,
        )
    return loss, entropy, correct
