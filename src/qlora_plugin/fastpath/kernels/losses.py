"""Causal-LM loss straight from the last hidden states: fp32 logits never materialise.

On CUDA with Liger: Liger's fused linear cross-entropy (chunked GEMM + softmax, the
input gradient computed during forward). Elsewhere: a chunked pure-PyTorch loss that
recomputes each chunk's logits in backward. Both match transformers' causal-LM loss:
labels shifted left by one, ``ignore_index`` -100, mean over counted tokens or sum
over ``num_items_in_batch``.
"""

from __future__ import annotations

import functools
import types
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora_plugin.core.patches import allowed
from qlora_plugin.fastpath.kernels._backend import use_liger
from qlora_plugin.fastpath.kernels.loss_stats import linear_cross_entropy_stats

IGNORE_INDEX = -100
_ORIG_FORWARD = "_qlora_fast_orig_forward"
_WITH_STATS = "_qlora_loss_with_stats"


def _chunk_ce_sum(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = (h @ w.t()).float()
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Chunked ``cross_entropy(hidden @ weight.T, targets)`` in plain PyTorch.

    ``hidden`` [N, H], ``weight`` [V, H], ``targets`` [N]. Each chunk's logits are
    recomputed in backward, so at most one chunk of fp32 logits is alive.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[s : s + chunk_size], targets[s : s + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_ce_sum, h, weight, y, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(h, weight, y)
    denom = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
    return total / denom


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Fused ``cross_entropy(hidden @ weight.T, targets)`` (fp32 softmax)."""
    hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    targets = targets.reshape(-1).contiguous()
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    if use_liger(hidden):
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = LigerFusedLinearCrossEntropyFunction.apply(
            hidden, weight, targets, None, None, IGNORE_INDEX, 0.0, 0.0, reduction
        )[0]
        return loss if num_items_in_batch is None else loss / num_items_in_batch
    return linear_cross_entropy_reference(hidden, weight, targets, num_items_in_batch)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets as transformers builds them: labels shifted left, -100 appended."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


@functools.cache
def causal_lm_output_with_stats() -> type:
    """transformers' causal-LM output plus the fields TRL's chunked-loss forward returns.

    TRL's SFTTrainer (``loss_type="chunked_nll"``) reads ``num_correct_tokens``,
    ``entropy_sum`` and ``num_valid_tokens`` from the model's output for its logged
    accuracy and entropy. Made on first use: importing this module loads no transformers.
    """
    from dataclasses import dataclass

    from transformers.modeling_outputs import CausalLMOutputWithPast

    @dataclass
    class CausalLMOutputWithStats(CausalLMOutputWithPast):
        num_correct_tokens: torch.Tensor | None = None
        entropy_sum: torch.Tensor | None = None
        num_valid_tokens: torch.Tensor | None = None
        aux_loss: torch.Tensor | None = None

    return CausalLMOutputWithStats


def _fused_loss_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    labels = kwargs.get("labels")
    if labels is None or not self.training or args or kwargs.get("return_dict") is False:
        return getattr(self, _ORIG_FORWARD)(*args, **kwargs)
    if kwargs.get("output_router_logits"):  # a mixture-of-experts balancing loss is added by the forward replaced
        return getattr(self, _ORIG_FORWARD)(*args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs = dict(kwargs)
    labels = kwargs.pop("labels")
    targets = kwargs.pop("shift_labels", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    for unused in ("logits_to_keep", "skip_logits", "return_token_accuracy", "use_token_scaling"):
        kwargs.pop(unused, None)  # the last three: TRL's requests to Liger's forward
    kwargs["use_cache"] = False
    outputs = self.model(**kwargs)
    hidden = outputs.last_hidden_state
    if targets is None:
        targets = shift_labels(labels.to(hidden.device))
    head = self.get_output_embeddings().weight
    if self.__dict__.get(_WITH_STATS):
        stats = linear_cross_entropy_stats(hidden, head, targets, num_items)
        return causal_lm_output_with_stats()(
            loss=stats.loss,
            logits=None,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            num_correct_tokens=stats.num_correct_tokens,
            entropy_sum=stats.entropy_sum,
            num_valid_tokens=stats.num_valid_tokens,
        )
    loss = linear_cross_entropy(hidden, head, targets, num_items)
    return CausalLMOutputWithPast(
        loss=cast("torch.FloatTensor", loss),  # transformers annotates FloatTensor; any float dtype is meant
        logits=None,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )


def patch_causal_lm_loss(causal_lm: Any, *, with_stats: bool = False) -> bool:
    """Make ``causal_lm`` compute its training loss without logits; returns whether it was patched.

    Only plain decoder LMs qualify: a ``.model`` decoder, an untied-or-tied linear
    output head without bias, and no logit soft-capping or scaling. In training with
    ``labels``, the patched forward returns ``logits=None``; otherwise it is unchanged
    (the forward it replaced runs). ``with_stats``: the output also carries TRL's
    chunked-loss statistics (see :func:`causal_lm_output_with_stats`), for a forward that
    replaces TRL's own.
    """
    if hasattr(causal_lm, _ORIG_FORWARD):
        return True

    if not allowed("transformers-causal-lm-forward"):
        return False
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    cfg = getattr(causal_lm, "config", None)
    ok = (
        isinstance(head, nn.Linear)
        and head.bias is None
        and isinstance(getattr(causal_lm, "model", None), nn.Module)
        and getattr(cfg, "final_logit_softcapping", None) is None
        and getattr(cfg, "logit_scale", None) in (None, 1.0)
        and getattr(cfg, "logits_scaling", None) in (None, 1.0)
    )
    if not ok:
        return False
    setattr(causal_lm, _ORIG_FORWARD, causal_lm.forward)
    causal_lm.__dict__[_WITH_STATS] = with_stats
    causal_lm.forward = types.MethodType(_fused_loss_forward, causal_lm)
    return True
