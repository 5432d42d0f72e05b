"""Attention for packed (padding-free) batches without a block-diagonal mask.

TRL's packing (``packing=True``, best-fit decreasing) and ``padding_free=True`` put
several sequences in one row and mark where each starts through ``position_ids``.
transformers' ``sdpa`` attention then builds a [rows, 1, T, T] mask for the whole row,
and PyTorch's SDPA runs a masked kernel over all T x T scores: for four 2,048-token
sequences in one row, four times the scores of the same sequences unpacked. Here each
sequence is attended to on its own, causally, with a flash kernel: sequences of one
length (rows cut into equal pieces) as a batch through ``scaled_dot_product_attention``,
exactly as if they had never been packed; mixed lengths through
``torch.nn.attention.varlen.varlen_attn`` where this PyTorch has it (one launch for the
row), else one ``scaled_dot_product_attention`` call per sequence length.

:func:`use_packed_attention` selects this for one model (its config's attention
implementation becomes :data:`IMPLEMENTATION`); batches that are not packed run
transformers' own ``sdpa`` attention and mask, unchanged.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from qlora_plugin.core import patches

PATCH = "transformers-attention-interface"
IMPLEMENTATION = "qlora_packed_sdpa"
SDPA_IMPLEMENTATIONS = ("sdpa", IMPLEMENTATION)
_SEGMENTS = "_qlora_packed_segments"


@dataclass(frozen=True)
class Segments:
    """Where the sequences of a packed batch start, over all its rows flattened."""

    cu_seqlens: torch.Tensor  # int32 [n + 1] on the batch's device
    lengths: tuple[int, ...]  # the length of each sequence, in order
    max_length: int


def find_segments(position_ids: torch.Tensor) -> Segments | None:
    """The sequences packed into ``position_ids`` [rows, T], or None when every row is one sequence.

    A sequence starts at the first token of a row and wherever the position does not
    follow the previous one (as transformers detects packing). One read-back to the host.
    """
    rows, length = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    bounds = starts.reshape(-1).nonzero().flatten().tolist()
    if len(bounds) == rows:
        return None
    bounds.append(rows * length)
    lengths = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=False))
    cu = torch.tensor(bounds, dtype=torch.int32).to(position_ids.device, non_blocking=True)
    return Segments(cu_seqlens=cu, lengths=lengths, max_length=max(lengths))


class SegmentCache:
    """The segments of the last ``position_ids`` one model saw: computed once per forward, shared by its layers."""

    def __init__(self) -> None:
        self.key: tuple[int, int, int] | None = None
        self.segments: Segments | None = None

    def get(self, position_ids: torch.Tensor) -> Segments | None:
        key = (id(position_ids), position_ids.data_ptr(), position_ids._version)
        if key != self.key:
            self.key, self.segments = key, find_segments(position_ids)
        return self.segments


def segments_of(module: nn.Module, query_length: int, key_length: int, kwargs: dict[str, Any]) -> Segments | None:
    """The packed segments an attention call of ``module`` must respect, or None."""
    cache: SegmentCache | None = module.__dict__.get(_SEGMENTS)
    position_ids = kwargs.get("position_ids")
    if cache is None or position_ids is None or query_length != key_length or position_ids.shape[-1] != query_length:
        return None
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    return cache.get(position_ids)


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: packed rows per sequence, everything else as ``sdpa``.

    ``query`` [rows, heads, T, dim], ``key``/``value`` [rows, kv_heads, T, dim]; returns
    [rows, T, heads, dim] as transformers' attention functions do.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = None
    if attention_mask is None and getattr(module, "is_causal", True):
        segments = segments_of(module, query.shape[2], key.shape[2], kwargs)
    if segments is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows, heads, length, _ = query.shape
    if len(set(segments.lengths)) == 1:  # equal sequences tile the rows: a batch of them, as if never packed
        size = segments.lengths[0]
        q_split, k_split, v_split = [
            t.transpose(1, 2).reshape(-1, size, t.shape[1], t.shape[-1]).transpose(1, 2) for t in (query, key, value)
        ]
        out, _ = sdpa_attention_forward(
            module, q_split, k_split, v_split, None, dropout=dropout, scaling=scaling, is_causal=True
        )
        return out.reshape(rows, length, heads, out.shape[-1]), None
    half = query.dtype in (torch.float16, torch.bfloat16)  # the flash kernel behind varlen_attn takes no other
    varlen, grouped_heads = _varlen_function() if dropout == 0.0 and query.is_cuda and half else (None, False)
    kv_heads = key.shape[1] if varlen is not None and grouped_heads else heads
    q, k, v = (_tokens_first(t, kv_heads if t is not query else heads) for t in (query, key, value))
    if varlen is not None:
        out = varlen(q, k, v, segments, scaling)
    else:
        out = _attention_per_length(q, k, v, segments, dropout, scaling)
    return out.reshape(rows, length, heads, out.shape[-1]), None


def _tokens_first(states: torch.Tensor, heads: int) -> torch.Tensor:
    """[rows, h, T, dim] -> [rows * T, heads, dim], repeating each of the h heads heads // h times."""
    groups = heads // states.shape[1]
    if groups > 1:
        states = states.repeat_interleave(groups, dim=1)
    rows, _, length, dim = states.shape
    return states.transpose(1, 2).reshape(rows * length, heads, dim)


def _attention_per_length(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, dropout: float, scaling: float | None
) -> torch.Tensor:
    """Causal SDPA over each sequence, with the sequences of one length batched together ([T, heads, dim] in, out)."""
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    starts = segments.cu_seqlens[:-1].tolist()
    by_length: dict[int, list[int]] = {}
    for start, length in zip(starts, segments.lengths, strict=False):
        by_length.setdefault(length, []).append(start)
    for length, group in by_length.items():
        index = (torch.tensor(group, device=q.device)[:, None] + torch.arange(length, device=q.device)).reshape(-1)
        qb, kb, vb = [
            t.index_select(0, index).view(len(group), length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)
        ]
        result = F.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout, scale=scaling, is_causal=True)
        out.index_copy_(0, index, result.transpose(1, 2).reshape(-1, *out.shape[1:]))
    return out


@functools.cache
def _varlen_function() -> tuple[Any, bool]:
    """A causal call over ``torch.nn.attention.varlen.varlen_attn`` as this PyTorch spells it (or None), and
    whether it takes fewer key/value heads than query heads."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, False
    if not patches.allowed("torch-varlen-attention"):
        return None, False
    parameters = inspect.signature(varlen_attn).parameters
    if "window_size" in parameters:
        causal: dict[str, Any] = {"window_size": (-1, 0)}
    elif "is_causal" in parameters:
        causal = {"is_causal": True}
    else:
        return None, False
    takes_scale = "scale" in parameters
    grouped = "enable_gqa" in parameters
    if grouped:
        causal["enable_gqa"] = True

    def call(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scaling: float | None
    ) -> torch.Tensor:
        if scaling is not None and not takes_scale:
            q = q * (scaling * q.shape[-1] ** 0.5)
        extra: dict[str, Any] = {"scale": scaling} if takes_scale and scaling is not None else {}
        cu = segments.cu_seqlens
        out = varlen_attn(q, k, v, cu, cu, segments.max_length, segments.max_length, **causal, **extra)
        return cast(torch.Tensor, out)  # a tuple only with return_aux, never passed here

    return call, grouped


def _packed_mask(
    *args: Any,
    attention_mask: torch.Tensor | None = None,
    q_length: int = 0,
    kv_length: int = 0,
    q_offset: int = 0,
    kv_offset: int = 0,
    **kwargs: Any,
) -> Any:
    """transformers mask function: no mask where the attention function separates packed sequences itself."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and not q_offset and not kv_offset:
        return None
    return sdpa_mask(
        *args,
        attention_mask=attention_mask,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        **kwargs,
    )


def supports_packed_attention(model: nn.Module) -> bool:
    """True for causal LMs on ``sdpa`` whose every layer attends causally over the full context."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in SDPA_IMPLEMENTATIONS:
        return False
    if getattr(config, "model_type", None) not in ("llama", "mistral", "qwen2", "qwen3"):
        return False
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    sliding = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return all(kind == "full_attention" for kind in layer_types) and sliding is None


def use_packed_attention(model: Any) -> int:
    """Give ``model`` (a causal LM) the packed-batch attention; returns the attention modules that got it.

    The attention function and its mask function are registered with transformers once per
    process, through the patch registry (:mod:`qlora_plugin.core.patches`, which can undo it).
    """
    if not supports_packed_attention(model) or not patches.apply(PATCH, _registrations):
        return 0
    cache = SegmentCache()
    attention = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "config")]
    for module in attention:
        module.__dict__[_SEGMENTS] = cache
    model.__dict__[_SEGMENTS] = cache
    model.set_attn_implementation(IMPLEMENTATION)
    return len(attention)


def _registrations(_: Any) -> tuple[str, tuple[Any, Any]]:
    """What goes into transformers' AttentionInterface and AttentionMaskInterface, under one name."""
    return IMPLEMENTATION, (packed_sdpa_attention, _packed_mask)


def batch_is_packed(model: nn.Module, position_ids: torch.Tensor | None) -> bool:
    """Whether ``position_ids`` hold several sequences per row for a model on the packed-batch attention."""
    cache: SegmentCache | None = model.__dict__.get(_SEGMENTS)
    if cache is None or position_ids is None:
        return False
    return cache.get(position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)) is not None
