"""The fast path's one log line: which parts are on, and where the training loss comes from."""

from __future__ import annotations

from torch import nn

from qlora_plugin.core.hookspecs import RecipeFields
from qlora_plugin.fastpath.kernels import FastPathConfig, FastPathReport

# The one setting that costs a user's own SFTConfig most beside the README's recipe.sft_config().
FULL_LOGITS_WARNING = (
    "qlora: the training loss is computed from full logits (TRL's loss_type='nll' or 'dft' before TRL 1.15, or "
    "your own loop): one float per vocabulary entry and token, slower and several GiB more than a loss without "
    "logits; with TRL, leave loss_type unset (chunked_nll, which the fast path computes without logits), set "
    "use_liger_kernel=True, or use TRL 1.15 or later (its losses need no logits)"
)
# The TRL forwards the fast path replaces with its own logit-free loss, and the patch that says where.
TRL_FORWARD_PATCHES = {"trl-chunked": "trl-chunked-loss-forward", "trl-fused": "trl-fused-head-forward"}
_TRL_FORWARD_NAMES = {"_chunked_ce_forward": "trl-chunked", "_fused_forward": "trl-fused"}


def loss_forward_owner(causal_lm: nn.Module) -> str | None:
    """Whose logit-free loss replaced the model's forward: ``"liger"``, ``"trl-chunked"`` (TRL
    1.9-1.14's ``chunked_nll``), ``"trl-fused"`` (TRL 1.15+'s fused LM head), ``"trl"`` (another
    TRL forward), or None (the model's own forward).

    Told by where the forward's code lives: TRL's replacement copies the model's name and
    module onto itself (``functools.wraps``), its code object keeps TRL's file and name.
    """
    func = getattr(causal_lm.forward, "__func__", causal_lm.forward)
    code = getattr(func, "__code__", None)
    path = code.co_filename.replace("\\", "/") if code is not None else ""
    if "/liger_kernel/" in path:
        return "liger"
    if "/trl/" in path:
        return _TRL_FORWARD_NAMES.get(code.co_name if code is not None else "", "trl")
    return None


def loss_description(result: FastPathReport, forward_owner: str | None, own_loss: bool) -> str:
    """Where the training loss comes from, for the fast path's log line."""
    if forward_owner == "liger":
        return "loss without logits: Liger's fused linear cross-entropy (the trainer's use_liger_kernel)"
    if forward_owner == "trl-chunked" and result.loss_fused:
        return (
            "loss without logits: the plugin's in place of TRL's chunked_nll (the same loss, token accuracy and "
            "entropy, from bf16 head GEMMs done once)"
        )
    if forward_owner == "trl-fused" and result.loss_fused:
        return (
            "loss without logits: the plugin's in place of TRL's fused LM head (the same per-token log-probabilities, "
            "entropy and top-1 hits, from bf16 head GEMMs done once)"
        )
    if forward_owner in ("trl", "trl-chunked", "trl-fused"):
        return "loss without logits: TRL's own (chunked_nll, or its fused LM head)"
    if result.loss_fused:
        return "loss without logits: the plugin's"
    if own_loss:
        return "loss from full logits (this model's output head is not supported without them)"
    return "loss from full logits: left to the trainer, which reads them (TRL loss_type 'nll'/'dft', or your own loop)"


def describe(
    result: FastPathReport,
    config: FastPathConfig,
    recipe: RecipeFields,
    loss: str,
    host_kernels: tuple[str, ...],
    quant_type: str = "",
) -> str:
    """One line: which parts of the fast path are on (``quant_type``: the base's, as loaded)."""
    dropout = f", LoRA dropout {recipe.lora_dropout}" if recipe.lora_dropout else ""
    parts = [
        f"fused LoRA over {quant_type or recipe.quant_type} on {result.lora_layers_fused} layers{dropout}",
        loss,
        f"RMSNorm on {result.norms_patched}, SwiGLU on {result.mlps_patched}, RoPE on {result.rope_patched} modules",
        f"recompute '{config.recompute}' (gradient_checkpointing={recipe.gradient_checkpointing!r})"
        + (", by the plugin's own function (no graph in forward)" if getattr(result, "own_recompute", False) else "")
        + (
            f", the first {config.offload_keep_layers} layer inputs kept on the GPU"
            if getattr(config, "offload_keep_layers", 0)
            else ""
        )
        + (
            f", the first {result.mlp_outputs_kept} layers' MLP gate and up outputs kept for the recompute"
            + (
                f" (the first {result.mlp_outputs_parked} in pinned host memory)"
                if getattr(result, "mlp_outputs_parked", 0)
                else ""
            )
            if result.mlp_outputs_kept
            else ""
        ),
        *(
            [f"CUDA graphs over {result.graphed_layers} decoder layers once batches repeat a shape"]
            if result.graphed_layers
            else []
        ),
        *(
            [
                f"CUDA graphs over {result.recompute_graphs} recomputed layers (forward, recompute and "
                "backward) once batches repeat a shape"
            ]
            if getattr(result, "recompute_graphs", 0)
            else []
        ),
        *(["packed rows attended per sequence (no block-diagonal mask)"] if result.packed_attention else []),
        *(
            [
                f"MLPs tiled in slices of {config.tiled_mlp_rows} tokens for steps of at least "
                f"{config.tiled_mlp_min_tokens} tokens"
            ]
            if getattr(result, "tiled_mlps", 0)
            else []
        ),
        f"frozen weights in {str(config.compute_dtype).removeprefix('torch.')}, adapters kept fp32",
    ]
    if host_kernels:
        parts.append(f"left to the trainer's own kernels: {', '.join(host_kernels)}")
    return "qlora fast path on: " + "; ".join(parts)
