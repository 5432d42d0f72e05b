"""Matrix products over tokens sorted by expert, a group of experts per launch.

A mixture-of-experts layer sends each token to a few experts. With the tokens sorted by
expert, every projection is one matrix product per expert over a contiguous run of rows:
a *grouped* product. ``torch.nn.functional.grouped_mm`` (torch >= 2.10) runs all of them
in one launch; where it cannot (older torch, another dtype on CUDA, strides it rejects)
the same products run one expert at a time, with the same results up to rounding.

- :class:`RoutedRows`: where each expert's rows lie (counts on the host, ends on the device).
- :func:`plan_runs`: which experts are dequantized together: runs of consecutive experts
  that received tokens, each capped at a byte budget, so that experts no token chose are
  never dequantized and no more than the budget exists in 16 bits at once.
- :class:`FrozenExpertsProduct`: ``x @ W_e^T`` for 4-bit expert weights, dequantized run by
  run in forward and again in backward; nothing of a dequantized weight is kept for backward.
- :class:`GroupedProduct`: ``x @ W_e`` with gradients for both (the LoRA factors).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

DEQUANT_RUN_BYTES = 256 * 2**20  # the most expert weight dequantized at once, in bytes of the compute dtype
KERNEL_ALIGNMENT = 16  # bytes: what torch's grouped kernels need of every stride and data pointer
# Dequantizes experts [first, stop) of one projection: a (stop - first, out, in) tensor in the compute dtype.
Dequantize = Callable[[int, int], torch.Tensor]


@dataclass(frozen=True)
class RoutedRows:
    """Rows sorted by expert: ``counts[e]`` rows of expert ``e``, ending at row ``ends[e]`` (a device tensor)."""

    counts: tuple[int, ...]
    ends: torch.Tensor  # int32 cumulative counts, on the rows' device

    @classmethod
    def from_counts(cls, counts: torch.Tensor) -> RoutedRows:
        """From per-expert token counts on the device (one host copy: the only synchronisation of a layer)."""
        return cls(tuple(int(c) for c in counts.tolist()), counts.cumsum(0).to(torch.int32))

    @classmethod
    def of_experts(cls, experts_of_rows: torch.Tensor, num_experts: int) -> RoutedRows:
        """From each routed row's expert: counted on the device (``bincount`` would read its maximum back first)."""
        counts = torch.zeros(num_experts, dtype=torch.int64, device=experts_of_rows.device)
        counts.index_add_(0, experts_of_rows, torch.ones_like(experts_of_rows, dtype=torch.int64))
        return cls.from_counts(counts)


@dataclass(frozen=True)
class ExpertRun:
    """Experts ``first`` .. ``stop - 1``, dequantized together; their rows are ``start`` .. ``end - 1``."""

    first: int
    stop: int
    start: int
    end: int


def plan_runs(rows: RoutedRows, bytes_per_expert: int, budget: int = DEQUANT_RUN_BYTES) -> list[ExpertRun]:
    """Runs of consecutive experts with tokens, each of at most ``budget`` bytes (at least one expert)."""
    per_run = max(1, budget // max(1, bytes_per_expert))
    runs: list[ExpertRun] = []
    row = 0
    first: int | None = None
    start = 0
    for expert, count in enumerate((*rows.counts, 0)):  # a sentinel closes the last run
        if first is not None and (count == 0 or expert - first == per_run):
            runs.append(ExpertRun(first, expert, start, row))
            first = None
        if count and first is None:
            first, start = expert, row
        row += count
    return runs


def _aligned(tensor: torch.Tensor) -> bool:
    size = tensor.element_size()
    strides_ok = all(stride * size % KERNEL_ALIGNMENT == 0 for stride in tensor.stride() if stride != 1)
    return strides_ok and tensor.data_ptr() % KERNEL_ALIGNMENT == 0


def grouped_kernel_usable(*tensors: torch.Tensor) -> bool:
    """Whether torch's grouped kernel takes these operands (else the products run expert by expert).

    CUDA: compute capability 8.0 or newer and bfloat16 (the dtype torch's CUDA kernel is built for).
    Any device: ``torch.nn.functional.grouped_mm`` exists and every stride and pointer is 16-byte aligned.
    """
    if not hasattr(torch.nn.functional, "grouped_mm"):
        return False
    first = tensors[0]
    if first.is_cuda and (torch.cuda.get_device_capability(first.device) < (8, 0) or first.dtype != torch.bfloat16):
        return False
    return all(t.dtype == first.dtype and t.device == first.device and _aligned(t) for t in tensors)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: tuple[int, ...], ends: torch.Tensor) -> torch.Tensor:
    """Row block ``e`` of ``x`` (``counts[e]`` rows, ending at ``ends[e]``) times ``weight[e]`` (E, K, N)."""
    if grouped_kernel_usable(x, weight):
        return torch.nn.functional.grouped_mm(x, weight, offs=ends)
    out = x.new_empty(x.shape[0], weight.shape[-1])
    row = 0
    for expert, count in enumerate(counts):
        if count:
            torch.mm(x[row : row + count], weight[expert], out=out[row : row + count])
        row += count
    return out


def grouped_outer(x: torch.Tensor, grad: torch.Tensor, counts: tuple[int, ...], ends: torch.Tensor) -> torch.Tensor:
    """Per expert ``e``: its rows of ``x`` transposed times its rows of ``grad``, (E, K, N); zero without rows."""
    x_t = x.t()
    if grouped_kernel_usable(x_t, grad):
        out = torch.nn.functional.grouped_mm(x_t, grad, offs=ends)
        # a kernel may leave empty groups unset; the mask comes from the device-side ends (a host list would
        # be copied over with a synchronisation)
        has_rows = torch.diff(ends, prepend=ends.new_zeros(1)) > 0
        return out * has_rows[:, None, None].to(out.dtype)
    out = x.new_zeros(len(counts), x.shape[1], grad.shape[1])
    row = 0
    for expert, count in enumerate(counts):
        if count:
            torch.mm(x_t[:, row : row + count], grad[row : row + count], out=out[expert])
        row += count
    return out


class GroupedProduct(torch.autograd.Function):
    """``x`` (rows sorted by expert) times ``weight[e]`` per expert, with gradients for both."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, rows: RoutedRows) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.rows = rows
        return grouped_mm(x, weight, rows.counts, rows.ends)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors
        rows: RoutedRows = ctx.rows
        grad = grad.contiguous()
        grad_x = grouped_mm(grad, weight.transpose(1, 2), rows.counts, rows.ends) if ctx.needs_input_grad[0] else None
        grad_weight = grouped_outer(x, grad, rows.counts, rows.ends) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None


def _frozen_product(
    x: torch.Tensor, runs: list[ExpertRun], rows: RoutedRows, dequantize: Dequantize, out_features: int, *, grad: bool
) -> torch.Tensor:
    """Forward (``x @ W_e^T``) or input gradient (``g @ W_e``) run by run; each run's weight is freed after use."""
    out = x.new_empty(x.shape[0], out_features)
    for run in runs:
        weight = dequantize(run.first, run.stop)  # (experts, out, in)
        rows_of_run = x[run.start : run.end]
        ends = rows.ends[run.first : run.stop] - run.start
        counts = rows.counts[run.first : run.stop]
        operand = weight if grad else weight.transpose(1, 2)
        out[run.start : run.end] = grouped_mm(rows_of_run, operand, counts, ends)
        del weight, operand
    return out


class FrozenExpertsProduct(torch.autograd.Function):
    """``x`` (rows sorted by expert) times each expert's frozen 4-bit weight, transposed: (rows, out).

    The weights are dequantized run by run (:func:`plan_runs`) in forward and again in
    backward; nothing of them is saved, and they get no gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        rows: RoutedRows,
        runs: list[ExpertRun],
        dequantize: Dequantize,
        shape: tuple[int, int],
    ) -> torch.Tensor:
        ctx.rows, ctx.runs, ctx.dequantize, ctx.in_features = rows, runs, dequantize, shape[1]
        return _frozen_product(x, runs, rows, dequantize, shape[0], grad=False)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        grad_x = _frozen_product(grad.contiguous(), ctx.runs, ctx.rows, ctx.dequantize, ctx.in_features, grad=True)
        return grad_x, None, None, None, None
