"""``apply_fast_path``: make a PEFT LoRA model over a bitsandbytes 4-bit base train fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qlora_plugin.fastpath.kernels.attention import use_packed_attention
from qlora_plugin.fastpath.kernels.casting import cast_adapters, cast_frozen_params
from qlora_plugin.fastpath.kernels.dequant import make_dequantizer
from qlora_plugin.fastpath.kernels.graphs import enable_decoder_graphs
from qlora_plugin.fastpath.kernels.kept_outputs import layers_keeping_mlp_outputs
from qlora_plugin.fastpath.kernels.layers import patch_norms_and_mlps, patch_rope, patched_mlps
from qlora_plugin.fastpath.kernels.lora_linear import LayerOptions, patch_lora_4bit_layers
from qlora_plugin.fastpath.kernels.losses import patch_causal_lm_loss
from qlora_plugin.fastpath.kernels.recompute import (
    layers_recomputed_without_graph,
    layers_replayed_as_graphs,
    set_recompute,
)
from qlora_plugin.fastpath.kernels.tiled_mlp import TiledMLPOptions, enable_tiled_mlp
from qlora_plugin.fastpath.tiling_defaults import TILED_MLP_MIN_TOKENS, TILED_MLP_ROWS


@dataclass(frozen=True)
class FastPathConfig:
    """What :func:`apply_fast_path` changes.

    compute_dtype: dtype of every GEMM and of the frozen non-4-bit weights.
    adapter_dtype: master dtype of the LoRA weights (what the optimizer updates).
    fused_lora: route LoRA-over-4-bit layers through one autograd function.
    fused_loss: compute the training loss without materialising logits.
    loss_outputs: with ``fused_loss``, what the loss's forward returns (``losses.LOSS_OUTPUTS``):
        the loss alone, or what the TRL forward it replaces returns (``"trl-chunked"``: TRL
        1.9-1.14's ``chunked_nll`` statistics; ``"trl-fused"``: TRL 1.15+'s per-token fields).
    fused_norm_mlp: Liger RMSNorm / SwiGLU (on CUDA) that save less for backward.
    fused_mlp: with ``fused_norm_mlp``, also the SwiGLU MLPs (False leaves them to another patch).
    skip_lora: names of projections (``q_proj``, ...) whose LoRA layers stay PEFT's
        (another library's kernels compute them).
    recompute: "none", "full" or "offload" (see ``recompute.set_recompute``).
    recompute_every: checkpoint every k-th decoder layer only (with "full"/"offload").
    offload_keep_layers: with "offload", the first this many checkpointed layers keep their
        inputs on the GPU (spares host memory; see ``recompute.set_recompute``).
    keep_mlp_layers: with "full" or "offload", this many checkpointed layers (the first ones after
        those of ``park_mlp_layers``) keep their MLP's gate and up outputs on the GPU for the
        recompute instead of computing them again (memory for time; see ``kept_outputs``).
    park_mlp_layers: with "full" or "offload", this many more checkpointed layers (the first
        ones, before those of ``keep_mlp_layers``) keep those outputs in pinned host memory.
    own_recompute: with "full" or "offload", recompute through the plugin's own autograd function
        where it serves (one process, no router logits; ``recompute.own_recompute_serves``) instead
        of torch's non-reentrant checkpoint: the same gradients, less work on the host thread.
    fused_rope: Liger's rotary embedding on CUDA (swaps the modeling module's
        ``apply_rotary_pos_emb`` for a dispatching function with the same math).
    cuda_graphs: replay the decoder layers as CUDA graphs when batches keep one shape
        (CUDA, recompute "none" only; see ``graphs.DecoderGraphs``).
    recompute_graphs: with "full" recompute of every layer through the plugin's own function, replay
        each layer's forward and its recompute-and-backward as CUDA graphs when batches keep one
        shape (see ``recompute_graphs``).
    triton_dequant: one-launch Triton NF4 dequantization instead of bitsandbytes' (CUDA).
    triton_dropout: LoRA dropout drawn inside Triton kernels that keep the mask as bits
        (CUDA; False: torch's dropout, which saves the dropped input and a byte mask).
    cache_block_constants: keep decoded fp32 block constants per weight (+1/16 of the
        bf16 weight size in memory, fewer launches per dequantization).
    packed_attention: attend to each sequence of a packed (padding-free) row on its own
        instead of through a block-diagonal mask (see ``attention``).
    tiled_mlp_min_tokens: with the fast path's SwiGLU MLPs, calls over at least this many
        tokens (batch x sequence) run in slices of ``tiled_mlp_rows`` tokens, each
        recomputed alone in backward (see ``tiled_mlp``); 0 never tiles.
    tiled_mlp_rows: tokens per slice of a tiled MLP.
    """

    compute_dtype: torch.dtype = torch.bfloat16
    adapter_dtype: torch.dtype = torch.float32
    fused_lora: bool = True
    fused_loss: bool = True
    loss_outputs: str = "loss"
    fused_norm_mlp: bool = True
    fused_mlp: bool = True
    skip_lora: tuple[str, ...] = ()
    recompute: str = "none"
    recompute_every: int = 1
    offload_keep_layers: int = 0
    keep_mlp_layers: int = 0
    park_mlp_layers: int = 0
    own_recompute: bool = True
    fused_rope: bool = True
    cuda_graphs: bool = False
    recompute_graphs: bool = False
    triton_dequant: bool = False
    triton_dropout: bool = True
    cache_block_constants: bool = False
    packed_attention: bool = True
    tiled_mlp_min_tokens: int = TILED_MLP_MIN_TOKENS
    tiled_mlp_rows: int = TILED_MLP_ROWS


@dataclass
class FastPathReport:
    """What was changed on the model."""

    frozen_params_cast: int = 0
    adapters_cast: int = 0
    lora_layers_fused: int = 0
    norms_patched: int = 0
    rope_patched: int = 0
    mlps_patched: int = 0
    loss_fused: bool = False
    layers_recomputed: int = 0
    graphed_layers: int = 0
    packed_attention: int = 0
    tiled_mlps: int = 0
    mlp_outputs_kept: int = 0
    mlp_outputs_parked: int = 0
    own_recompute: bool = False
    recompute_graphs: int = 0
    notes: list[str] = field(default_factory=list)


def _causal_lm(model: nn.Module) -> Any:  # the transformers model, whose attributes are read
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def apply_fast_path(
    model: nn.Module,
    *,
    compute_dtype: torch.dtype | None = None,
    config: FastPathConfig | None = None,
) -> FastPathReport:
    """Make a PEFT LoRA model over a bitsandbytes 4-bit base fast to train, in place.

    Changes: frozen non-4-bit weights to ``compute_dtype`` (undoing fp32 upcasts);
    LoRA master weights to ``adapter_dtype``; LoRA-over-4-bit layers fused; RMSNorm /
    SwiGLU swapped for lower-memory versions on CUDA; loss computed from hidden states
    (training forward with labels returns ``logits=None``); decoder-layer recompute
    set. Works on CPU with the pure-PyTorch reference implementations.
    """
    cfg = config or FastPathConfig()
    if compute_dtype is not None and compute_dtype != cfg.compute_dtype:
        cfg = FastPathConfig(**{**cfg.__dict__, "compute_dtype": compute_dtype})
    report = FastPathReport()
    lm = _causal_lm(model)
    report.frozen_params_cast = cast_frozen_params(lm, cfg.compute_dtype)
    report.adapters_cast = cast_adapters(lm, cfg.adapter_dtype)
    for module in lm.modules():  # bitsandbytes layers compute in this dtype
        if hasattr(module, "compute_dtype") and type(module).__name__ == "Linear4bit":
            module.compute_dtype = cfg.compute_dtype
    if cfg.fused_lora:
        options = LayerOptions(
            dequant=make_dequantizer(triton=cfg.triton_dequant, cache_block_constants=cfg.cache_block_constants),
            triton_dropout=cfg.triton_dropout,
        )
        report.lora_layers_fused = patch_lora_4bit_layers(
            lm, skip=cfg.skip_lora, compute_dtype=cfg.compute_dtype, options=options
        )
    if cfg.fused_norm_mlp:
        report.norms_patched, report.mlps_patched = patch_norms_and_mlps(lm, mlps=cfg.fused_mlp)
        tiling = TiledMLPOptions(rows=cfg.tiled_mlp_rows, min_tokens=cfg.tiled_mlp_min_tokens)
        report.tiled_mlps = enable_tiled_mlp(patched_mlps(lm), tiling)
    if cfg.fused_rope:
        report.rope_patched = patch_rope(lm)
    if cfg.fused_loss:
        report.loss_fused = patch_causal_lm_loss(lm, outputs=cfg.loss_outputs)
        if not report.loss_fused:
            report.notes.append("loss not fused: model head or config not supported")
    if cfg.packed_attention:
        report.packed_attention = use_packed_attention(lm)
    report.layers_recomputed = set_recompute(
        lm,
        cfg.recompute,
        every=cfg.recompute_every,
        keep_on_gpu=cfg.offload_keep_layers,
        keep_mlp_layers=cfg.keep_mlp_layers,
        park_mlp_layers=cfg.park_mlp_layers,
        own=cfg.own_recompute,
        graphs=cfg.recompute_graphs,
    )
    report.own_recompute = layers_recomputed_without_graph(lm) > 0
    report.recompute_graphs = layers_replayed_as_graphs(lm)
    report.mlp_outputs_kept = layers_keeping_mlp_outputs(lm)
    report.mlp_outputs_parked = layers_keeping_mlp_outputs(lm, parked=True)
    if cfg.cuda_graphs and cfg.recompute == "none":
        graphs = enable_decoder_graphs(lm, lm.__dict__.get("_qlora_adapter_copies"))
        report.graphed_layers = 0 if graphs is None else len(graphs.layers)
    if hasattr(lm, "config"):
        lm.config.use_cache = False
    return report
