"""Which of the fast path's kernels a run asks for on a device."""

from __future__ import annotations

from collections.abc import Iterable

from qlora_plugin.build.context import RunContext
from qlora_plugin.fastpath.kernels import FastPathConfig
from qlora_plugin.fastpath.tiling_defaults import TILED_MLP_MIN_TOKENS

# Axolotl's LoRA kernel switches, and the projections each one computes itself.
HOST_KERNEL_LAYERS = {
    "lora_qkv_kernel": ("q_proj", "k_proj", "v_proj"),
    "lora_o_kernel": ("o_proj",),
    "lora_mlp_kernel": ("gate_proj", "up_proj", "down_proj"),
}


def kernel_config(
    context: RunContext,
    device: str | None = None,
    *,
    fuse_loss: bool = False,
    loss_outputs: str = "loss",
    host_kernels: Iterable[str] = (),
) -> FastPathConfig:
    """The :class:`qlora_plugin.fastpath.kernels.FastPathConfig` the run of ``context`` asks for on ``device``.

    ``device``: default the run's. ``fuse_loss``: compute the training loss without logits
    (only where the trainer reads nothing else and the model's forward is still its own);
    ``loss_outputs``: what that loss's forward returns, the loss alone or what the TRL forward it
    replaces returns (see ``FastPathConfig``); ``host_kernels``: the trainer's own LoRA kernels
    that are on. The recompute mode is the run's; CUDA graphs go on at the speed point (recompute
    "none") unless the knobs say otherwise, and over the recomputed layers (recompute "full", CUDA)
    where they ask for it, as do packed attention, the tiled-MLP threshold, the layer
    inputs kept on the GPU under offloaded recompute, the MLP outputs kept for the recompute and
    which function recomputes (:class:`qlora_plugin.core.environment.Knobs`).
    """
    device = device or context.device
    host_kernels = tuple(host_kernels)
    knobs = context.knobs
    mode = context.recompute
    if mode == "offload" and device != "cuda":
        mode = "full"  # host offload needs CUDA streams; recomputing alone still saves the memory
    return FastPathConfig(
        compute_dtype=context.dtype_on(device),
        fused_loss=fuse_loss,
        loss_outputs=loss_outputs,
        fused_mlp="lora_mlp_kernel" not in host_kernels,
        recompute=mode,
        cache_block_constants=mode == "none",  # +1/16 of the bf16 weight size: the speed point only
        cuda_graphs=mode == "none" and not host_kernels and knobs.cuda_graphs,
        recompute_graphs=mode == "full"
        and device == "cuda"
        and not host_kernels
        and knobs.cuda_graphs
        and knobs.recompute_graphs,
        packed_attention=knobs.packed_attention,
        tiled_mlp_min_tokens=TILED_MLP_MIN_TOKENS if knobs.tiled_mlp_min_tokens is None else knobs.tiled_mlp_min_tokens,
        offload_keep_layers=knobs.offload_keep_layers if mode == "offload" else 0,
        keep_mlp_layers=knobs.keep_mlp_layers if mode in ("full", "offload") else 0,
        park_mlp_layers=knobs.park_mlp_layers if mode in ("full", "offload") and device == "cuda" else 0,
        own_recompute=not knobs.torch_checkpoint,
        skip_lora=tuple(name for key in host_kernels for name in HOST_KERNEL_LAYERS.get(key, ())),
    )
