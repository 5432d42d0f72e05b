"""LoRA dropout as a bit-packed keep-mask: the PyTorch reference (CPU) and the Triton
kernels run under Triton's CPU interpreter against it. No speed thresholds here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny_qlora import SRC

from qlora_plugin.fastpath.kernels.lora_dropout import (
    dropout_add_grad_x_reference,
    dropout_down_reference,
    dropout_grad_a_reference,
    pack_keep_mask,
    unpack_keep_mask,
)

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("t,k", [(1, 1), (3, 31), (5, 32), (4, 33), (7, 200), (2, 64)])
def test_keep_mask_packs_32_columns_to_a_word_and_back(t, k) -> None:
    keep = torch.rand(t, k, generator=torch.Generator().manual_seed(k)) >= 0.5
    bits = pack_keep_mask(keep)
    assert bits.dtype == torch.int32 and bits.shape == (t, (k + 31) // 32)
    assert torch.equal(unpack_keep_mask(bits, k), keep)
    assert torch.equal(
        unpack_keep_mask(pack_keep_mask(torch.ones(t, k, dtype=torch.bool)), k).all(1), torch.ones(t, dtype=torch.bool)
    )
    if k >= 32:  # column c is bit c % 32 of word c // 32; bit 31 makes the int32 negative
        one = torch.zeros(1, k, dtype=torch.bool)
        one[0, 31] = True
        assert int(pack_keep_mask(one)[0, 0]) == -(2**31)


@pytest.mark.parametrize("t,k,r,p", [(9, 40, 16, 0.3), (1, 64, 4, 0.05), (33, 100, 20, 0.5)])
def test_reference_products_match_float64_dropout(t, k, r, p) -> None:
    gen = torch.Generator().manual_seed(t + k)
    x, a = torch.randn(t, k, generator=gen).bfloat16(), torch.randn(r, k, generator=gen).bfloat16()
    gu, grad_x = torch.randn(t, r, generator=gen).bfloat16(), torch.randn(t, k, generator=gen).bfloat16()
    keep = torch.rand(t, k, generator=gen) >= p
    u, bits = dropout_down_reference(x, a, p, keep)
    xd = x.double() * keep / (1 - p)
    assert torch.allclose(u.double(), xd @ a.double().t(), rtol=1e-2, atol=1e-2)
    assert torch.allclose(dropout_grad_a_reference(gu, x, bits, p).double(), gu.double().t() @ xd, rtol=1e-4, atol=1e-4)
    want = grad_x.double() + (gu.double() @ a.double()) * keep / (1 - p)
    got = dropout_add_grad_x_reference(grad_x, gu, a, bits, p)
    assert got is grad_x and torch.allclose(got.double(), want, rtol=1e-2, atol=2e-2)
    if t * k >= 300:  # a drawn mask keeps some and drops some
        drawn = unpack_keep_mask(dropout_down_reference(x, a, p)[1], k)
        assert 0 < int(drawn.sum()) < drawn.numel()


def test_triton_kernels_match_the_reference_under_the_interpreter() -> None:
    pytest.importorskip("triton")
    cases = [(100, 96, 16, 0.3), (64, 64, 8, 0.05), (130, 200, 20, 0.5), (1, 40, 16, 0.1), (257, 128, 64, 0.2)]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)])}
    out = subprocess.run(
        [sys.executable, str(HERE / "_interpret_lora_dropout.py"), *map(json.dumps, cases)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(cases)
    for row in rows:
        t, k, _ = row["shape"]
        assert row["bits_match_reference_packing"] and row["lanes_differ"], row
        assert row["same_seed_same_mask"] and row["new_seed_new_mask"], row
        assert abs(row["dropped"] - row["p"]) < 4 * (row["p"] * (1 - row["p"]) / (t * k)) ** 0.5 + 1e-3, row
        assert max(row["u_err"], row["grad_a_err"], row["grad_x_err"]) < 2e-3, row
