"""Run the loss-statistics Triton kernel and its autograd function under Triton's CPU interpreter.

Started by tests/test_loss_stats.py in a subprocess with TRITON_INTERPRET=1 (the variable must be
set before Triton is imported). float32 inputs: the interpreter has no bf16 arithmetic. Prints one
JSON object per case: the kernel's rows and the whole function's results against the references.
"""

from __future__ import annotations

import json
import sys

import torch

from qlora_plugin.fastpath.kernels import loss_stats
from qlora_plugin.fastpath.kernels.triton_loss_stats import row_stats_and_grad_


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12))


def main(cases: list[tuple[int, int, int]]) -> None:
    for rows, hidden_size, vocab in cases:
        gen = torch.Generator().manual_seed(rows * 7 + vocab)
        logits = torch.randn(rows, vocab, generator=gen) * 4
        targets = torch.randint(0, vocab, (rows,), generator=gen)
        targets[::3] = -100
        logits[1, 5] = 60.0  # a certain hit: row 1 is counted (1 % 3 != 0)
        targets[1] = 5
        scale = torch.tensor([1.0 / 7])
        grad = logits.clone()
        loss, entropy, correct = row_stats_and_grad_(grad, targets, scale, -100)
        ref_loss, ref_entropy, ref_correct = loss_stats.row_stats_reference(logits, targets)
        valid = targets != -100
        want_grad = torch.softmax(logits.double(), -1)
        want_grad[torch.arange(rows)[valid], targets[valid]] -= 1
        want_grad = want_grad * scale.double() * valid[:, None]

        # the autograd function end to end, in chunks of 3 rows, against float64 autograd
        loss_stats.CHUNK_BYTES = 3 * vocab * 4
        hidden = torch.randn(rows, hidden_size, generator=gen, requires_grad=True)
        weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).requires_grad_(True)
        got_loss, got_correct, got_entropy = loss_stats._FusedLinearCrossEntropyStats.apply(
            hidden, weight, targets, scale
        )
        (got_loss.sum() * 2.0).backward()
        h64 = hidden.detach().double().requires_grad_(True)
        w64 = weight.detach().double().requires_grad_(True)
        z64 = h64 @ w64.t()
        want_loss = torch.nn.functional.cross_entropy(z64, targets, ignore_index=-100, reduction="sum") / 7
        (want_loss * 2.0).backward()
        _, want_entropy, want_correct = loss_stats.row_stats_reference(z64, targets)

        # the per-token function (TRL 1.15+'s fused LM head fields) under a per-token weighting
        stats_grad_hidden, hidden.grad = hidden.grad, None
        weights = torch.rand(rows, generator=gen)
        token_log_probs, token_entropy, token_top1 = loss_stats._FusedLinearTokenLogProbs.apply(
            hidden, weight.detach(), targets
        )
        (token_log_probs * weights).sum().backward()
        t64 = hidden.detach().double().requires_grad_(True)
        want_log_probs = -torch.nn.functional.cross_entropy(
            t64 @ w64.detach().t(), targets, ignore_index=-100, reduction="none"
        )
        (want_log_probs * weights.double()).sum().backward()
        print(
            json.dumps(
                dict(
                    shape=[rows, hidden_size, vocab],
                    row_loss_err=_err(loss, ref_loss),
                    row_entropy_err=_err(entropy, ref_entropy),
                    row_correct_equal=bool(torch.equal(correct, ref_correct)),
                    row_grad_err=_err(grad, want_grad),
                    ignored_rows_zero=bool((grad[~valid] == 0).all() and (loss[~valid] == 0).all()),
                    loss_err=_err(got_loss.detach().reshape(()), want_loss.detach()),
                    correct_equal=float(got_correct) == float(want_correct.sum()),
                    entropy_err=_err(got_entropy, want_entropy.sum()),
                    grad_hidden_err=_err(stats_grad_hidden, h64.grad),
                    grad_weight_err=_err(weight.grad, w64.grad),
                    token_log_probs_err=_err(token_log_probs.detach(), want_log_probs.detach()),
                    token_entropy_err=_err(token_entropy, want_entropy),
                    token_top1_equal=bool(torch.equal(token_top1, want_correct.float())),
                    token_grad_hidden_err=_err(hidden.grad, t64.grad),
                )
            ),
            flush=True,
        )


if __name__ == "__main__":
    main([tuple(json.loads(arg)) for arg in sys.argv[1:]])
