"""Run the LoRA-dropout Triton kernels under Triton's CPU interpreter; print what they computed.

Started by tests/test_lora_dropout.py in a subprocess with TRITON_INTERPRET=1 (the
variable must be set before Triton is imported). fp16 inputs: the interpreter has no
bf16 arithmetic. Prints one JSON object per case.
"""

from __future__ import annotations

import json
import sys

import torch

from qlora_plugin.fastpath.kernels import triton_lora_dropout as kernels
from qlora_plugin.fastpath.kernels.lora_dropout import (
    dropout_add_grad_x_reference,
    dropout_down_reference,
    dropout_grad_a_reference,
    unpack_keep_mask,
)


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))


def main(cases: list[tuple[int, int, int, float]]) -> None:
    for t, k, r, p in cases:
        gen = torch.Generator().manual_seed(t * 1000 + k)
        x = torch.randn(t, k, generator=gen).half()
        a = (torch.randn(r, k, generator=gen) / k**0.5).half()
        gu = torch.randn(t, r, generator=gen).half()
        grad_x = torch.randn(t, k, generator=gen).half()
        seed = torch.tensor([t + 7 * k], dtype=torch.int64)
        u, bits = kernels.dropout_down(x, a, p, seed)
        keep = unpack_keep_mask(bits, k)
        u_ref, bits_ref = dropout_down_reference(x, a, p, keep)
        ga = kernels.dropout_grad_a(gu, x, bits, p)
        gx = kernels.dropout_add_grad_x(grad_x.clone(), gu, a, bits, p)
        print(
            json.dumps(
                dict(
                    shape=[t, k, r],
                    p=p,
                    dropped=1.0 - float(keep.float().mean()),
                    # a Philox call's 4 draws serve 4 neighbouring columns: no two may be the same draw
                    lanes_differ=all(
                        bool((keep[:, i::4] != keep[:, j::4]).any()) for i in range(4) for j in range(i + 1, 4)
                    )
                    if t * k >= 4096
                    else True,
                    bits_match_reference_packing=bool(torch.equal(bits, bits_ref)),
                    same_seed_same_mask=bool(torch.equal(kernels.dropout_down(x, a, p, seed)[1], bits)),
                    new_seed_new_mask=not torch.equal(kernels.dropout_down(x, a, p, seed + 1)[1], bits),
                    u_err=_err(u, u_ref),
                    grad_a_err=_err(ga, dropout_grad_a_reference(gu, x, bits, p)),
                    grad_x_err=_err(gx, dropout_add_grad_x_reference(grad_x.clone(), gu, a, bits, p)),
                )
            ),
            flush=True,
        )


if __name__ == "__main__":
    main([tuple(json.loads(c)) for c in sys.argv[1:]])
