"""Causal-LM loss from the last hidden states, with the statistics TRL logs, and no logits kept.

TRL's SFTTrainer (the releases whose default ``loss_type`` is ``"chunked_nll"``) replaces a
model's forward with one that projects 256 tokens at a time in float32 (the output head is
cast to float32 for every chunk, and its GEMMs run off the tensor cores) under activation
checkpointing, so the head's work is done three times. A user who brings their own
``SFTConfig`` gets that loss. :func:`linear_cross_entropy_stats` returns what that forward
returns (the loss, the number of correctly predicted tokens, the summed entropy and the
number of counted tokens) from bf16 GEMMs in chunks of about 256 MiB of logits, with the
gradient of the hidden states computed during the forward (one head GEMM each way, none
repeated). On CUDA a Triton kernel (:mod:`qlora_plugin.fastpath.kernels.triton_loss_stats`)
makes one pass per row; elsewhere a PyTorch reference with the same results runs.

TRL 1.15 and later instead call the model with ``fused_lm_head=True`` and read per-token
log-probabilities, entropies and top-1 hits. :func:`linear_token_log_probs` returns those
from the same kernel: each row's gradient is kept unscaled from the forward, so any
per-token weighting of the log-probabilities (TRL's ``dft`` loss) scales it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from qlora_plugin.fastpath.kernels._backend import use_gpu_kernels

IGNORE_INDEX = -100
# Logits held at once by the CUDA path: big enough that the head's GEMMs run at full rate
# (1,024 rows of a 128k vocabulary), small beside a decoder layer's activations.
CHUNK_BYTES = 256 * 1024**2


@dataclass
class LossStats:
    """A loss and TRL's per-batch statistics over the counted (non-ignored) tokens."""

    loss: torch.Tensor  # summed token loss over ``denominator`` (differentiable)
    num_correct_tokens: torch.Tensor  # float32 count
    entropy_sum: torch.Tensor  # float32, nats
    num_valid_tokens: torch.Tensor  # int64 count


def row_stats_reference(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (loss, entropy, correct) in float32, as the Triton kernel computes them."""
    z = logits.float()
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    log_p = torch.log_softmax(z, dim=-1)
    loss = -log_p.gather(-1, safe[:, None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    correct = (z.argmax(-1) == safe).float()
    zero = torch.zeros((), dtype=torch.float32, device=z.device)
    return torch.where(valid, loss, zero), torch.where(valid, entropy, zero), torch.where(valid, correct, zero)


def _scale(denominator: torch.Tensor) -> torch.Tensor:
    """One over the token count, 0 where nothing is counted (then loss and gradients are 0)."""
    denominator = denominator.float()
    return torch.where(denominator > 0, 1.0 / denominator.clamp_min(1.0), torch.zeros_like(denominator))


class _FusedLinearCrossEntropyStats(torch.autograd.Function):
    """bf16 head GEMMs in chunks; the kernel writes each chunk's logit gradient in place; the
    hidden states' (and a trainable head's) gradient is formed in forward and scaled in backward."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from qlora_plugin.fastpath.kernels.triton_loss_stats import row_stats_and_grad_

        rows, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(1, min(rows, CHUNK_BYTES // (vocab * hidden.element_size())))
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:  # a trainable output head (PEFT's modules_to_save)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(loss)
        correct = torch.zeros_like(loss)
        for start in range(0, rows, chunk):
            h = hidden[start : start + chunk]
            logits = h @ weight.t()
            row_loss, row_entropy, row_correct = row_stats_and_grad_(
                logits, targets[start : start + chunk], scale, IGNORE_INDEX
            )
            loss += row_loss.sum()
            entropy += row_entropy.sum()
            correct += row_correct.sum()
            if grad_hidden is not None:
                torch.mm(logits, weight, out=grad_hidden[start : start + chunk])
            if grad_weight is not None:
                grad_weight += (logits.t() @ h).float()
        ctx.mark_non_differentiable(entropy, correct)
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else torch.empty(0),
            grad_weight.to(weight.dtype) if grad_weight is not None else torch.empty(0),
        )
        ctx.has_grads = (grad_hidden is not None, grad_weight is not None)
        return loss * scale, correct, entropy

    @staticmethod
    def backward(
        ctx: Any, grad_loss: torch.Tensor, _correct: Any, _entropy: Any
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        has_hidden, has_weight = ctx.has_grads
        factor = grad_loss.to(grad_hidden.dtype) if has_hidden else None
        return (
            grad_hidden * factor if has_hidden else None,
            grad_weight * grad_loss.to(grad_weight.dtype) if has_weight else None,
            None,
            None,
        )


def _chunk_loss_sum(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = (h @ w.t()).float()
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")


def _reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PyTorch path: chunked, each chunk's logits recomputed in backward; statistics without gradients."""
    from torch.utils.checkpoint import checkpoint

    loss = hidden.new_zeros((), dtype=torch.float32)
    entropy = hidden.new_zeros((), dtype=torch.float32)
    correct = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            loss = loss + checkpoint(_chunk_loss_sum, h, weight, y, use_reentrant=False)
        else:
            loss = loss + _chunk_loss_sum(h, weight, y)
        with torch.no_grad():
            _, row_entropy, row_correct = row_stats_reference(h @ weight.t(), y)
        entropy += row_entropy.sum()
        correct += row_correct.sum()
    return loss * scale, correct, entropy


def linear_cross_entropy_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> LossStats:
    """``cross_entropy(hidden @ weight.T, targets)`` with TRL's statistics, logits never kept.

    ``hidden`` [..., H], ``weight`` [V, H], ``targets`` [...] (already shifted; -100 ignored).
    The loss is the token losses' sum over ``num_items_in_batch`` (a gradient-accumulation
    total, as transformers passes it) or, without it, over the counted tokens. No value is
    read back to the host.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    num_valid = (targets != IGNORE_INDEX).sum()
    if num_items_in_batch is None:
        denominator = num_valid
    elif isinstance(num_items_in_batch, torch.Tensor):
        denominator = num_items_in_batch.to(hidden.device)
    else:
        denominator = torch.tensor(num_items_in_batch, device=hidden.device)
    scale = _scale(denominator).reshape(1)
    if use_gpu_kernels(hidden):
        loss, correct, entropy = _FusedLinearCrossEntropyStats.apply(hidden.contiguous(), weight, targets, scale)
    else:
        loss, correct, entropy = _reference(hidden, weight, targets, scale[0])
    return LossStats(loss=loss.reshape(()), num_correct_tokens=correct, entropy_sum=entropy, num_valid_tokens=num_valid)


@dataclass
class TokenLogProbs:
    """Per-token statistics of the next-token distribution, zero where the target is ignored."""

    log_probs: torch.Tensor  # float32, log p(target) (differentiable)
    entropy: torch.Tensor  # float32, nats (no gradient)
    is_top1: torch.Tensor  # bool, the target is the most likely token


class _FusedLinearTokenLogProbs(torch.autograd.Function):
    """bf16 head GEMMs in chunks; each row's gradient of ``-log p(target)`` is formed in forward
    and, in backward, multiplied by that row's upstream gradient (rows are independent)."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from qlora_plugin.fastpath.kernels.triton_loss_stats import row_stats_and_grad_

        rows, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(1, min(rows, CHUNK_BYTES // (vocab * hidden.element_size())))
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        one = torch.ones(1, dtype=torch.float32, device=hidden.device)
        loss = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(loss)
        correct = torch.empty_like(loss)
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            logits = hidden[start:stop] @ weight.t()
            loss[start:stop], entropy[start:stop], correct[start:stop] = row_stats_and_grad_(
                logits, targets[start:stop], one, IGNORE_INDEX
            )
            if grad_hidden is not None:
                torch.mm(logits, weight, out=grad_hidden[start:stop])
        ctx.mark_non_differentiable(entropy, correct)
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else torch.empty(0))
        ctx.has_grad = grad_hidden is not None
        return -loss, entropy, correct

    @staticmethod
    def backward(
        ctx: Any, grad_log_probs: torch.Tensor, _entropy: Any, _correct: Any
    ) -> tuple[torch.Tensor | None, None, None]:
        (grad_hidden,) = ctx.saved_tensors
        if not ctx.has_grad:
            return None, None, None
        # d log p / d h = -(softmax - onehot) @ W, the row the forward kept
        return grad_hidden * (-grad_log_probs).to(grad_hidden.dtype)[:, None], None, None


def _chunk_log_probs(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = (h @ w.t()).float()
    return -F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="none")


def _token_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PyTorch path: chunked, each chunk's logits recomputed in backward; statistics without gradients."""
    from torch.utils.checkpoint import checkpoint

    log_probs, entropy, correct = [], [], []
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            log_probs.append(checkpoint(_chunk_log_probs, h, weight, y, use_reentrant=False))
        else:
            log_probs.append(_chunk_log_probs(h, weight, y))
        with torch.no_grad():
            _, row_entropy, row_correct = row_stats_reference(h @ weight.t(), y)
        entropy.append(row_entropy)
        correct.append(row_correct)
    if not log_probs:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty, empty
    return torch.cat(log_probs), torch.cat(entropy), torch.cat(correct)


def linear_token_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> TokenLogProbs:
    """``log_softmax(hidden @ weight.T)`` at ``targets``, per token, with entropy and top-1 hits, logits never kept.

    ``hidden`` [..., H], ``weight`` [V, H], ``targets`` [...] (already shifted; -100 ignored);
    every output has the shape of ``targets``. A trainable ``weight`` (PEFT's
    ``modules_to_save`` head) takes the PyTorch path, whose gradient reaches it.
    """
    shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    if use_gpu_kernels(hidden) and not weight.requires_grad:
        log_probs, entropy, correct = _FusedLinearTokenLogProbs.apply(hidden.contiguous(), weight, targets)
    else:
        log_probs, entropy, correct = _token_reference(hidden, weight, targets)
    return TokenLogProbs(
        log_probs=log_probs.reshape(shape), entropy=entropy.reshape(shape), is_top1=correct.reshape(shape).bool()
    )
