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
from qlora_plugin.fastpath.kernels.loss_stats import linear_cross_entropy_stats, linear_token_log_probs

IGNORE_INDEX = -100
_ORIG_FORWARD = "_qlora_fast_orig_forward"
_WITH_STATS = "_qlora_loss_with_stats"
_TRL_FIELDS = "_qlora_trl_fused_head_fields"
# What a forward that replaces a trainer's returns: the loss alone; TRL 1.9-1.14's chunked_nll
# output (loss and summed statistics); TRL 1.15+'s fused LM head output (per-token fields).
LOSS_OUTPUTS = ("loss", "trl-chunked", "trl-fused")
# The per-token fields of TRL's fused LM head that the plugin computes.
TRL_FUSED_FIELDS = frozenset({"log_probs", "entropy", "is_top1"})


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


def shift_labels_of(labels: torch.Tensor) -> torch.Tensor:
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
        targets = shift_labels_of(labels.to(hidden.device))
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


def trl_fused_head_fields(forward: Any) -> frozenset[str] | None:
    """The per-token fields TRL's fused-LM-head forward was asked for, where the plugin can compute them.

    TRL 1.15+ (``add_fused_lm_head``) keeps its settings in the forward's closure. The plugin
    replaces that forward only where they are SFT's: temperature 1, the head in the compute
    dtype, no logit soft-capping or scaling, the backbone at ``base_model``, and fields among
    log-probabilities, entropy and top-1 hits. Anything else (or a closure of another shape):
    None, and TRL's forward stays.
    """
    func = getattr(forward, "__func__", forward)
    code, closure = getattr(func, "__code__", None), getattr(func, "__closure__", None)
    if code is None or closure is None or code.co_name != "_fused_forward":
        return None
    try:
        cells = {name: cell.cell_contents for name, cell in zip(code.co_freevars, closure, strict=True)}
    except (ValueError, TypeError):  # an empty cell, or a closure of another shape
        return None
    fields = cells.get("outputs")
    supported = (
        cells.get("temperature") == 1.0
        and cells.get("cast_lm_head_to_fp32") is False
        and cells.get("final_logit_softcapping") is None
        and cells.get("logit_scale") == 1.0
        and cells.get("backbone_attr") == "base_model"
        and isinstance(fields, tuple)
        and set(fields) <= TRL_FUSED_FIELDS
    )
    return frozenset(fields) if supported and isinstance(fields, tuple) else None


def _trl_fused_head_forward(
    self: Any,
    *args: Any,
    fused_lm_head: bool = False,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: Any = None,
    **kwargs: Any,
) -> Any:
    trl_forward = getattr(self, _ORIG_FORWARD)
    router_logits = kwargs.get("output_router_logits") or getattr(
        self.config.get_text_config(), "output_router_logits", False
    )
    if not fused_lm_head or args or not self.training or (labels is None and shift_labels is None) or router_logits:
        return trl_forward(
            *args,
            fused_lm_head=fused_lm_head,
            labels=labels,
            shift_labels=shift_labels,
            num_items_in_batch=num_items_in_batch,
            **kwargs,
        )
    from trl.trainer import utils as trl_utils

    output_type = vars(trl_utils)["FusedCausalLMOutput"]  # TRL 1.15+ only, as this forward

    kwargs["use_cache"] = False
    hidden = self.model(**kwargs).last_hidden_state
    if shift_labels is None:
        # score every position against the next label (-100 after the last) and drop the last
        targets = shift_labels_of(cast(torch.Tensor, labels).to(hidden.device))
    else:
        targets = shift_labels.to(hidden.device)
    per_token = linear_token_log_probs(hidden, self.get_output_embeddings().weight, targets)
    scored = slice(None, -1) if shift_labels is None else slice(None)
    log_probs, entropy, is_top1 = (t[:, scored] for t in (per_token.log_probs, per_token.entropy, per_token.is_top1))
    mask = (targets != IGNORE_INDEX)[:, scored]
    denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    fields = self.__dict__[_TRL_FIELDS]
    return output_type(
        loss=-log_probs.sum() / denominator,
        log_probs=log_probs,
        entropy=entropy if "entropy" in fields else None,
        is_top1=is_top1 if "is_top1" in fields else None,
        label_mask=mask,
    )


def patch_causal_lm_loss(causal_lm: Any, *, outputs: str = "loss") -> bool:
    """Make ``causal_lm`` compute its training loss without logits; returns whether it was patched.

    Only plain decoder LMs qualify: a ``.model`` decoder, an untied-or-tied linear
    output head without bias, and no logit soft-capping or scaling. In training with
    ``labels``, the patched forward returns ``logits=None``; otherwise it is unchanged
    (the forward it replaced runs). ``outputs`` (one of :data:`LOSS_OUTPUTS`): ``"trl-chunked"``,
    the output also carries TRL 1.9-1.14's chunked-loss statistics (see
    :func:`causal_lm_output_with_stats`); ``"trl-fused"``, the forward answers TRL 1.15+'s
    ``fused_lm_head=True`` calls with per-token fields (see :func:`trl_fused_head_fields`), and
    every other call goes to TRL's forward.
    """
    if outputs not in LOSS_OUTPUTS:
        raise ValueError(f"outputs={outputs!r}: one of {', '.join(LOSS_OUTPUTS)}")
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
    if outputs == "trl-fused":
        fields = trl_fused_head_fields(causal_lm.forward)
        if fields is None:
            return False
        causal_lm.__dict__[_TRL_FIELDS] = fields
    setattr(causal_lm, _ORIG_FORWARD, causal_lm.forward)
    causal_lm.__dict__[_WITH_STATS] = outputs == "trl-chunked"
    forward = _trl_fused_head_forward if outputs == "trl-fused" else _fused_loss_forward
    causal_lm.forward = types.MethodType(forward, causal_lm)
    return True
