"""``qlora estimate``: the peak GPU memory of a training step and the GPUs it fits."""

from __future__ import annotations

import argparse
import math
from typing import Any

from qlora_plugin.commands.options import add_recipe_options, recipe_from_args, subcommand
from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.fastpath.tiling_defaults import TILED_MLP_MIN_TOKENS, TILED_MLP_ROWS
from qlora_plugin.tools.console import console, count, gib, print_json, table
from qlora_plugin.tools.estimate import (
    COMPONENT_LABELS,
    GIB,
    LOGIT_BYTES,
    RESERVE_BYTES,
    Dimensions,
    Parallel,
    check_gpus,
    estimate_memory,
    fused_loss_chunk,
    gpu_table,
    training_path,
)
from qlora_plugin.tools.inspection import analyze
from qlora_plugin.tools.model_source import model_source


def register(commands: Any) -> None:
    """Add the subcommand's parser to ``commands``."""
    parser = subcommand(
        commands,
        "estimate",
        "predict the peak GPU memory of a QLoRA training step and the GPUs it fits",
        "qlora estimate ./Llama-3.1-8B --seq 2048 --batch 4 --gpu h100-80gb --recompute offload",
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="a model directory (only config.json is read), an Axolotl YAML (its base_model) or a hub id",
    )
    parser.add_argument("--seq", type=int, required=True, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    parser.add_argument(
        "--gpu",
        action="append",
        default=None,
        metavar="NAME",
        help="only this GPU in the fit table (repeatable); names: see the table",
    )
    parser.add_argument(
        "--gpus", type=int, default=1, help="GPUs the run is spread over (default 1); the estimate is per GPU"
    )
    parser.add_argument(
        "--strategy",
        default="ddp",
        metavar="ddp|fsdp",
        help="with --gpus > 1: ddp (each GPU a whole replica) or fsdp (parameters, gradients and "
        "optimizer states sharded); default ddp",
    )
    add_recipe_options(parser)
    path = parser.add_argument_group("training path (defaults follow the recipe: fast_path, gradient_checkpointing)")
    path.add_argument(
        "--path",
        choices=["stock", "fast"],
        default=None,
        help="stock: PEFT's fp32 upcasts; fast: the base in the compute dtype",
    )
    path.add_argument(
        "--recompute",
        choices=["none", "full", "offload"],
        default=None,
        help="decoder-layer recompute in backward; offload parks layer inputs in host memory",
    )
    path.add_argument(
        "--fused-loss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fast path: chunked loss without full logits (default on)",
    )
    path.add_argument(
        "--kernels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fast path: fused LoRA over NF4, fused RMSNorm/SwiGLU, fully paged AdamW (default on)",
    )
    path.add_argument(
        "--adapter-dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="fast path: dtype of the LoRA weights (default float32 masters)",
    )
    path.add_argument(
        "--cached-constants",
        action="store_true",
        default=None,
        help="fast path: the 4-bit block constants kept decoded in float32",
    )
    path.add_argument(
        "--tiled-mlp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"fast path with kernels: steps of {TILED_MLP_MIN_TOKENS:,} tokens or more run each MLP in slices "
        f"of {TILED_MLP_ROWS:,} tokens (default on, as the kernels do; QLORA_TILED_MLP=N moves the threshold, "
        "as in training)",
    )
    path.add_argument(
        "--offload-keep-layers",
        type=int,
        default=None,
        metavar="N",
        help="with --recompute offload: the first N layer inputs stay on the GPU (default QLORA_OFFLOAD_KEEP_LAYERS, "
        "else 0)",
    )
    path.add_argument(
        "--keep-mlp-layers",
        type=int,
        default=None,
        metavar="N",
        help="with --recompute full or offload: N layers (after the parked ones) keep their MLP's gate and up "
        "outputs on the GPU for the recompute (default QLORA_KEEP_MLP_LAYERS, else 0)",
    )
    path.add_argument(
        "--park-mlp-layers",
        type=int,
        default=None,
        metavar="N",
        help="with --recompute full or offload: N more layers (the first ones) keep those outputs in pinned host "
        "memory (default QLORA_PARK_MLP_LAYERS, else 0)",
    )
    path.add_argument(
        "--host-gib",
        type=float,
        default=None,
        metavar="GIB",
        help="with --recompute offload: the training host's available memory; inputs it has no room for stay "
        "on the GPU, as in training (default: no limit)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    """``qlora estimate``."""

    for name in ("seq", "batch"):
        if getattr(args, name) < 1:
            raise QLoRAConfigError(f"--{name}", getattr(args, name), "must be at least 1", f"pass --{name} 1 or more")
    if args.host_gib is not None and not (math.isfinite(args.host_gib) and args.host_gib >= 0):
        raise QLoRAConfigError(
            "--host-gib", args.host_gib, "must be a number >= 0", "pass the training host's available memory in GiB"
        )
    gpus = check_gpus(args.gpu)
    parallel = Parallel(args.gpus, args.strategy)
    source = model_source(args.model)
    recipe = recipe_from_args(args, source.section)
    path = path_from_args(args, recipe)
    report = analyze(source.model, recipe)
    warnings = report.warnings(args.seq)
    result = estimate_memory(report, args.seq, args.batch, path, parallel)
    fits = gpu_table(report, args.seq, args.batch, path, gpus, parallel)
    if args.json:
        print_json(result.to_dict() | {"gpus": fits, "warnings": warnings})
        return 0
    out = console()
    dims = Dimensions.from_config(report.config)
    tokens = args.seq * args.batch
    out.print(
        f"[bold]{report.source}[/bold]  batch {args.batch} x {args.seq} tokens = {tokens:,} tokens per step; "
        f"{path.describe()}; {result.optimizer}; {parallel.describe()}"
    )
    notes = {
        "weights_4bit": f"{count(sum(t.in_features * t.out_features for t in report.quantized_linears))} params in NF4"
        + (" + decoded fp32 constants" if path.cached_constants else ""),
        "unquantized_params": f"{count(report.unquantized_params())} params in "
        f"{'fp32 (stock path upcast)' if path.name == 'stock' else 'the compute dtype'}",
        "adapters": f"{count(report.trainable_params)} params in {path.adapter_dtype}",
        "gradients": "same dtype as the adapters; not yet alive at the loss",
        "optimizer_states": f"{gib(result.paged_optimizer)} GiB of it paged (CUDA managed memory)",
        "activations": (
            f"recompute {path.recompute}; {gib(result.activations['without_recompute'])} GiB without, "
            f"{gib(result.activations['with_full_recompute'])} GiB with full recompute"
        ),
        "ddp_buckets": "one flat copy of every adapter gradient, held by DDP's reducer",
        "fsdp_all_gather": "one decoder layer and the root unit (embeddings, head) unsharded, "
        "and one layer's adapter gradients before the reduce-scatter",
        "loss": (
            f"fused, {fused_loss_chunk(tokens, dims.vocab, dims.hidden)}-row chunks"
            if path.fused_loss
            else f"{LOGIT_BYTES} bytes x {dims.vocab:,} vocabulary per token"
        ),
    }
    rows = [[COMPONENT_LABELS[key], gib(value), notes.get(key, "")] for key, value in result.components.items()]
    rows.append(["", "", ""])
    rows += [
        [f"at {moment}", gib(value), "peak" if moment == result.peak_moment else ""]
        for moment, value in result.moments.items()
    ]
    rows.append(
        [
            "[bold]peak GPU memory[/bold]",
            f"[bold]{gib(result.peak)}[/bold]",
            f"allocator peak {gib(result.allocator_peak)} + paged optimizer {gib(result.paged_optimizer)}",
        ]
    )
    out.print(table("Memory of one training step (GiB)", ["component", "GiB", "notes"], rows, {1}))
    for note in result.notes:
        out.print(f"[yellow]note:[/yellow] {note}")
    for warning in warnings:
        out.print(f"[yellow]warning:[/yellow] {warning}")
    out.print()
    rows = [
        [
            row["gpu"],
            row["memory_gib"],
            "[green]yes[/green]" if row["fits"] else "[red]no[/red]",
            row["headroom_gib"],
            f"≥ {row['largest_batch']}" if row["largest_batch_capped"] else row["largest_batch"] or "-",
        ]
        for row in fits
    ]
    out.print(
        table(
            f"Fits on (keeping {RESERVE_BYTES // GIB} GiB for the CUDA context)",
            ["GPU", "GiB", "fits", "headroom GiB", f"largest batch at seq {args.seq}"],
            rows,
            {1, 3, 4},
        )
    )
    return 0


def path_from_args(args: argparse.Namespace, recipe: Any) -> Any:
    """The :class:`~qlora_plugin.tools.estimate.TrainingPath` the options describe (recipe defaults for the rest)."""
    return training_path(
        recipe,
        args.path,
        recompute=args.recompute,
        fused_loss=args.fused_loss,
        kernels=args.kernels,
        adapter_dtype=args.adapter_dtype,
        cached_constants=args.cached_constants,
        tiled_mlp=args.tiled_mlp,
        offload_keep_layers=args.offload_keep_layers,
        keep_mlp_layers=args.keep_mlp_layers,
        park_mlp_layers=args.park_mlp_layers,
        host_available=None if args.host_gib is None else int(args.host_gib * 1024**3),
    )
