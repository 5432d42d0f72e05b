"""Grouped products over rows sorted by expert (qlora_plugin.build.expert_matmul): the run plan by property,
torch's grouped kernel and the expert-by-expert loop against plain per-expert products, gradients included."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_plugin.build.expert_matmul import (
    GroupedProduct,
    RoutedRows,
    grouped_kernel_usable,
    grouped_mm,
    grouped_outer,
    plan_runs,
)


def rows_of(counts: list[int]) -> RoutedRows:
    return RoutedRows.from_counts(torch.tensor(counts, dtype=torch.int64))


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(0, 5), min_size=1, max_size=40), per_run=st.integers(1, 9))
def test_runs_cover_exactly_the_routed_experts_in_row_order_within_the_budget(counts, per_run) -> None:
    runs = plan_runs(rows_of(counts), bytes_per_expert=10, budget=10 * per_run)
    covered = [e for run in runs for e in range(run.first, run.stop)]
    assert covered == [e for e, c in enumerate(counts) if c]  # routed experts only, each once, in order
    ends = [sum(counts[: e + 1]) for e in range(len(counts))]
    assert all(
        run.end == ends[run.stop - 1] and run.start == run.end - sum(counts[run.first : run.stop]) for run in runs
    )
    assert all(0 < run.stop - run.first <= per_run for run in runs)
    for before, after in zip(runs, runs[1:], strict=False):  # a run ends only at an unrouted expert or when full
        assert before.stop < after.first or before.stop - before.first == per_run
    assert [(r.start, r.end) for r in runs] == sorted((r.start, r.end) for r in runs)
    assert sum(r.end - r.start for r in runs) == sum(counts)


def test_an_expert_larger_than_the_budget_is_still_one_run() -> None:
    assert [(r.first, r.stop) for r in plan_runs(rows_of([2, 0, 3, 1]), bytes_per_expert=100, budget=10)] == [
        (0, 1),
        (2, 3),
        (3, 4),
    ]


def per_expert_products(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    pieces, row = [], 0
    for expert, count in enumerate(counts):
        pieces.append(x[row : row + count] @ weight[expert])
        row += count
    return torch.cat(pieces)


@pytest.mark.parametrize(("k", "n"), [(16, 8), (7, 5)])  # aligned for torch's kernel; odd: the loop
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 4, 0], [1, 1, 1, 1]])
def test_grouped_products_and_their_gradients_equal_per_expert_products(k, n, counts) -> None:
    generator = torch.Generator().manual_seed(sum(counts) + k)
    rows = rows_of(counts)
    x = torch.randn(sum(counts), k, generator=generator, requires_grad=True)
    weight = torch.randn(len(counts), k, n, generator=generator, requires_grad=True)
    assert grouped_kernel_usable(x, weight) == ((k, n) == (16, 8) and hasattr(torch.nn.functional, "grouped_mm"))
    grad = torch.randn(sum(counts), n, generator=generator)
    out = GroupedProduct.apply(x, weight, rows)
    out.backward(grad)
    ours = (out.detach(), x.grad.clone(), weight.grad.clone())
    x.grad = weight.grad = None
    expected = per_expert_products(x, weight, counts)
    expected.backward(grad)
    for got, want in zip(ours, (expected.detach(), x.grad, weight.grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    unrouted = [e for e, c in enumerate(counts) if c == 0]
    assert not ours[2][unrouted].any()  # experts without rows get a zero gradient


def test_grouped_outer_zeroes_experts_without_rows_on_both_paths() -> None:
    counts = (0, 3, 0)
    rows = rows_of(list(counts))
    for k in (16, 7):
        x, grad = torch.randn(3, k), torch.randn(3, 8)
        result = grouped_outer(x, grad, counts, rows.ends)
        assert result.shape == (3, k, 8)
        assert not result[0].any() and not result[2].any()
        torch.testing.assert_close(result[1], x.t() @ grad)
        torch.testing.assert_close(grouped_mm(x, result, counts, rows.ends), x @ result[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("counts", [[37, 0, 128, 5, 0, 64, 1, 200], [16] * 8])
def test_torch_s_cuda_grouped_kernel_equals_per_expert_products_in_bf16(counts) -> None:
    rows = RoutedRows.from_counts(torch.tensor(counts, device="cuda"))
    x = torch.randn(sum(counts), 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(8, 256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert grouped_kernel_usable(x, weight) == hasattr(torch.nn.functional, "grouped_mm")
    grad = torch.randn(sum(counts), 128, device="cuda", dtype=torch.bfloat16)
    out = GroupedProduct.apply(x, weight, rows)
    out.backward(grad)
    ours = (out.detach(), x.grad.clone(), weight.grad.clone())
    x.grad = weight.grad = None
    expected = per_expert_products(x.float(), weight.float(), counts)
    expected.backward(grad.float())
    for got, want in zip(ours, (expected.detach(), x.grad, weight.grad), strict=True):
        assert torch.nn.functional.cosine_similarity(got.float().flatten(), want.float().flatten(), dim=0) > 0.9999
    assert not ours[2][[1, 4]].any() if 0 in counts else True


@settings(max_examples=100, deadline=None)
@given(experts=st.lists(st.integers(0, 6), max_size=60), num_experts=st.integers(7, 9))
def test_rows_counted_on_the_device_equal_bincount(experts, num_experts) -> None:
    flat = torch.tensor(experts, dtype=torch.int64)
    rows = RoutedRows.of_experts(flat, num_experts)
    expected = torch.bincount(flat, minlength=num_experts)
    assert rows.counts == tuple(expected.tolist())
    assert rows.ends.dtype == torch.int32 and rows.ends.tolist() == expected.cumsum(0).tolist()
