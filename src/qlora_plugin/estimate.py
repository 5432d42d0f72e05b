"""``qlora estimate``: the peak GPU memory of one QLoRA training step, from the config.

Everything is derived from the model's shapes (built on the meta device) and
the recipe's dtypes; nothing is fitted to measurements. ``T`` is the number of
tokens in a micro-batch (batch x sequence length), ``c`` the compute dtype's
bytes (2 for bf16), and the step is what transformers' ``Trainer`` runs with the
recipe's arguments: forward and loss under bf16 autocast, backward, clipping,
the optimizer step, gradients set to ``None``.

Resident for the whole step
  * 4-bit weights: every linear layer but the output head, packed two per byte,
    plus the blockwise constants (see :func:`qlora_plugin.inspection.nf4_bytes`).
  * Unquantized parameters (embeddings, untied head, norms, biases): ``c`` bytes
    each on the fast path; 4 on the stock path, whose
    ``prepare_model_for_kbit_training`` casts them to float32.
  * Adapters (and, from the first step on, the optimizer states): float32 on the
    stock path, ``c`` on the fast path. ``paged_adamw_32bit`` keeps two float32
    states per parameter; bitsandbytes pages (CUDA managed memory, outside
    PyTorch's allocator) the states of tensors of at least 100k elements.

Activations, per token and decoder layer, counted as the tensors autograd saves
(bitsandbytes' 4-bit matmul saves none of its input):
  * each adapted layer with input width ``d``: the dropout mask (1 byte x ``d``),
    the dropped input in the compute dtype (``c`` x ``d``) and the LoRA rank
    activation (``c`` x ``r``); without dropout the fast path's shared input is
    saved once per group (q/k/v, gate/up);
  * each norm: its input in float32 (4 x hidden);
  * attention through SDPA's flash / memory-efficient kernels (no padding mask):
    q, k, v and the output in ``c`` bytes plus one float32 log-sum-exp per head;
  * the MLP: for a gated MLP the gate output, its activation and the up output
    (3 x intermediate), else the activation's input, in ``m`` bytes: ``c`` on the
    fast path, 4 on the stock path (bitsandbytes returns its output in the dtype
    of its input, float32 there);
  * the residual stream between layers is ``a`` bytes wide: ``c`` fast, 4 stock.
  With gradient checkpointing only each layer's input (``a`` x hidden) stays,
  and one layer's activations come back during its backward.

Logits: the loss takes the bf16 logits to float32 and saves float32
log-probabilities; its backward holds those, their gradient and the logits'
gradient at once: 12 bytes x vocabulary per token, the largest single moment for
vocabularies like Llama 3's. The stock path also holds a bf16 copy of its
float32 output head for the head's backward.

The peak is the largest of three moments: the loss's backward, the backward of
the last decoder layer, and the optimizer step.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qlora_plugin.inspection import ModelReport
    from qlora_plugin.recipe import QLoRARecipe

GIB = 1024**3
MIB = 1024**2
PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages optimizer states of tensors at least this large
EIGHT_BIT_MIN_NUMEL = 4096  # bitsandbytes keeps smaller tensors' states in 32 bits
LOGIT_BYTES = 12  # float32 log-probabilities + their gradient + the logits' gradient
SHARED_INPUTS = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
GATED_LEAVES = {"gate_proj", "gate_up_proj", "w1", "w3"}
# GPUs and the memory their drivers report (MiB, nvidia-smi's total).
GPUS: dict[str, tuple[str, int]] = {
    "t4-16gb": ("NVIDIA T4 16 GB", 15360),
    "l4-24gb": ("NVIDIA L4 24 GB", 23034),
    "a10g-24gb": ("NVIDIA A10G 24 GB", 23028),
    "rtx3090-24gb": ("GeForce RTX 3090 24 GB", 24576),
    "rtx4090-24gb": ("GeForce RTX 4090 24 GB", 24564),
    "rtx5090-32gb": ("GeForce RTX 5090 32 GB", 32607),
    "a100-40gb": ("NVIDIA A100 40 GB", 40960),
    "l40s-48gb": ("NVIDIA L40S 48 GB", 46068),
    "a100-80gb": ("NVIDIA A100 80 GB", 81920),
    "h100-80gb": ("NVIDIA H100 80 GB", 81559),
    "h200-141gb": ("NVIDIA H200 141 GB", 143771),
}
# Kept free on the card for the CUDA context, library handles and allocator slack.
RESERVE_BYTES = 1 * GIB


@dataclass
class Dimensions:
    """The sizes of a decoder that decide its memory."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> Dimensions:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config

        def first(*names: str, default: Any = None) -> Any:
            for name in names:
                value = getattr(text, name, None)
                if value is not None:
                    return value
            return default

        hidden = first("hidden_size", "n_embd", "d_model")
        heads = first("num_attention_heads", "n_head")
        intermediate = first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
        experts_per_token = first("num_experts_per_tok")
        if experts_per_token and first("moe_intermediate_size"):
            intermediate = experts_per_token * first("moe_intermediate_size") + first(
                "shared_expert_intermediate_size", default=0)
        elif experts_per_token:
            intermediate = experts_per_token * intermediate
        return cls(
            layers=first("num_hidden_layers", "n_layer"),
            hidden=hidden,
            heads=heads,
            kv_heads=first("num_key_value_heads", default=heads),
            head_dim=first("head_dim", default=hidden // heads),
            intermediate=intermediate,
            vocab=first("vocab_size"),
        )


@dataclass
class MemoryEstimate:
    """Predicted memory of one training step, by component (bytes)."""

    model: str
    seq: int
    batch: int
    path: str
    gradient_checkpointing: bool
    optimizer: str
    components: dict[str, int]
    activations: dict[str, int]
    moments: dict[str, int]
    paged_optimizer: int
    notes: list[str] = field(default_factory=list)

    @property
    def allocator_peak(self) -> int:
        """The peak PyTorch's allocator sees (``torch.cuda.max_memory_allocated``)."""
        return max(self.moments.values())

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=self.moments.get)

    @property
    def peak(self) -> int:
        """Peak GPU memory of the step: the allocator's peak plus the paged optimizer states."""
        return self.allocator_peak + self.paged_optimizer

    def fits(self, gpu_mib: int) -> bool:
        return self.peak + RESERVE_BYTES <= gpu_mib * MIB

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "seq": self.seq, "batch": self.batch, "path": self.path,
            "gradient_checkpointing": self.gradient_checkpointing, "optimizer": self.optimizer,
            "components": self.components, "activations": self.activations, "moments": self.moments,
            "paged_optimizer": self.paged_optimizer, "allocator_peak": self.allocator_peak,
            "peak_moment": self.peak_moment, "peak": self.peak, "notes": self.notes,
        }


def estimate_memory(report: ModelReport, seq: int, batch: int) -> MemoryEstimate:
    """The memory model of the module docstring, applied to ``report`` at ``batch`` x ``seq``."""
    recipe = report.recipe
    dims = Dimensions.from_config(report.config)
    stock = not recipe.fast_path
    c = 4 if recipe.compute_dtype == "float32" else 2
    a = m = 4 if stock else c  # residual stream and MLP activations
    param_bytes = 4 if stock else c
    tokens = seq * batch

    trainable = report.trainable_params
    optimizer_torch, optimizer_paged = optimizer_bytes(report.lora_tensor_sizes(), recipe.optimizer, param_bytes)
    components = {
        "weights_4bit": report.quantized_bytes(),
        "unquantized_params": report.unquantized_params() * param_bytes,
        "adapters": trainable * param_bytes,
        "gradients": trainable * param_bytes,
        "optimizer_states": optimizer_torch + optimizer_paged,
    }
    resident = components["weights_4bit"] + components["unquantized_params"] + components["adapters"]

    per_layer = layer_activation_bytes(report, dims, c=c, a=a, m=m)
    final_norm = 4 * dims.hidden
    rope = 2 * a * dims.head_dim
    inputs = 3 * 8  # input ids, labels, shifted labels (int64)
    autocast_copies = trainable * 2 if stock else 0  # bf16 copies of fp32 adapters, saved for backward
    head_copy = 2 * dims.vocab * dims.hidden if stock else 0
    checkpointed = (dims.layers * a * dims.hidden + final_norm + rope + inputs) * tokens
    full = (dims.layers * per_layer + final_norm + rope + inputs) * tokens + autocast_copies
    logits = LOGIT_BYTES * dims.vocab * tokens + head_copy
    activations = {
        "per_layer_per_token": per_layer,
        "with_checkpointing": checkpointed,
        "without_checkpointing": full,
        "logits": logits,
    }
    components["activations"] = checkpointed if recipe.gradient_checkpointing else full
    components["logits"] = logits

    largest_weight = max((t.in_features * t.out_features for t in report.quantized_linears), default=0)
    working = (2 * a * dims.hidden + 3 * m * dims.intermediate) * tokens + c * largest_weight
    if recipe.gradient_checkpointing:
        layer_backward = checkpointed + per_layer * tokens + working
    else:
        layer_backward = full + working
    moments = {
        "loss backward": resident + optimizer_torch + components["activations"] + logits,
        "layer backward": resident + optimizer_torch + components["gradients"] + layer_backward,
        "optimizer step": resident + optimizer_torch + components["gradients"],
    }
    notes = []
    if recipe.use_dora:
        notes.append("DoRA's per-layer weight-norm temporaries are not modelled; expect more")
    if not report.linears or not dims.layers:
        notes.append("no decoder layers found; activations may be far off")
    return MemoryEstimate(
        model=report.source, seq=seq, batch=batch, path="stock" if stock else "fast",
        gradient_checkpointing=recipe.gradient_checkpointing, optimizer=recipe.optimizer,
        components=components, activations=activations, moments=moments, paged_optimizer=optimizer_paged,
        notes=notes,
    )


def layer_activation_bytes(report: ModelReport, dims: Dimensions, *, c: int, a: int, m: int) -> int:
    """Bytes autograd saves per token in one decoder layer without checkpointing."""
    recipe = report.recipe
    layers = max(dims.layers, 1)
    mask = 1 if recipe.lora_dropout > 0 else 0
    shared_once = recipe.fast_path and not mask
    lora = 0
    counted: set[tuple[str, int]] = set()
    for target in report.target_linears:
        parent, leaf = target.name.rsplit(".", 1) if "." in target.name else ("", target.name)
        key = (parent, target.in_features)
        saves_input = not (shared_once and leaf in SHARED_INPUTS and key in counted)
        counted.add(key)
        lora += mask * target.in_features + c * target.in_features * saves_input + c * recipe.r
    lora /= layers
    norms = 4 * dims.hidden * max(report.norm_count - 1, 0) / layers
    q, kv = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    attention = c * (2 * q + 2 * kv) + 4 * dims.heads
    gated = any(t.name.rsplit(".", 1)[-1] in GATED_LEAVES for t in report.linears)
    mlp = (3 if gated else 1) * m * dims.intermediate
    return int(lora + norms + attention + mlp)


def optimizer_bytes(sizes: list[int], optimizer: str, param_bytes: int) -> tuple[int, int]:
    """(bytes in PyTorch's allocator, bytes paged) of the optimizer states for tensors of ``sizes``."""
    in_torch = paged = 0
    for numel in sizes:
        if optimizer == "adamw_torch":
            in_torch += 2 * numel * param_bytes
            continue
        if optimizer == "paged_adamw_8bit" and numel >= EIGHT_BIT_MIN_NUMEL:
            nbytes = 2 * numel + 2 * math.ceil(numel / 256) * 4 + 2 * 256 * 4
        else:
            nbytes = 2 * numel * 4
        if optimizer.startswith("paged_") and numel >= PAGED_MIN_NUMEL:
            paged += nbytes
        else:
            in_torch += nbytes
    return in_torch, paged


def estimate(model: str | os.PathLike[str], recipe: QLoRARecipe, seq: int, batch: int) -> MemoryEstimate:
    """Analyze ``model`` (config only) under ``recipe`` and estimate a step at ``batch`` x ``seq``."""
    from qlora_plugin.inspection import analyze

    return estimate_memory(analyze(model, recipe), seq, batch)


def largest_batch(report: ModelReport, seq: int, gpu_mib: int, limit: int = 1024) -> int:
    """The largest micro-batch at ``seq`` whose estimate fits in ``gpu_mib`` (0 if none)."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        if estimate_memory(report, seq, middle).fits(gpu_mib):
            low = middle
        else:
            high = middle - 1
    return low


def gpu_table(report: ModelReport, seq: int, batch: int, gpus: list[str] | None = None) -> list[dict[str, Any]]:
    """For each GPU: whether the step fits, the headroom, and the largest micro-batch that fits."""
    result = estimate_memory(report, seq, batch)
    rows = []
    for key in gpus or list(GPUS):
        label, mib = GPUS[key]
        rows.append({
            "gpu": key, "name": label, "memory_gib": round(mib * MIB / GIB, 1),
            "fits": result.fits(mib), "headroom_gib": round((mib * MIB - RESERVE_BYTES - result.peak) / GIB, 2),
            "largest_batch": largest_batch(report, seq, mib),
        })
    return rows


COMPONENT_LABELS = {
    "weights_4bit": "4-bit weights + double-quant constants",
    "unquantized_params": "unquantized embeddings / head / norms",
    "adapters": "LoRA adapters",
    "gradients": "adapter gradients",
    "optimizer_states": "optimizer states",
    "activations": "activations",
    "logits": "logits and loss",
}


def check_gpus(names: list[str] | None) -> list[str] | None:
    """Validate ``--gpu`` names."""
    from qlora_plugin.errors import QLoRAConfigError, nearest

    for name in names or []:
        if name not in GPUS:
            raise QLoRAConfigError("--gpu", name, "is not a GPU this table knows" + nearest(name, GPUS),
                                   f"use one of {list(GPUS)}")
    return names


def command(args: Any) -> int:
    """``qlora estimate``."""
    from qlora_plugin.cli import recipe_from_args
    from qlora_plugin.console import console, count, gib, print_json, table
    from qlora_plugin.errors import QLoRAConfigError
    from qlora_plugin.inspection import analyze

    for name in ("seq", "batch"):
        if getattr(args, name) < 1:
            raise QLoRAConfigError(f"--{name}", getattr(args, name), "must be at least 1", f"pass --{name} 1 or more")
    gpus = check_gpus(args.gpu)
    report = analyze(args.model, recipe_from_args(args))
    result = estimate_memory(report, args.seq, args.batch)
    fits = gpu_table(report, args.seq, args.batch, gpus)
    if args.json:
        print_json(result.to_dict() | {"gpus": fits})
        return 0
    out = console()
    tokens = args.seq * args.batch
    checkpointing = "on" if result.gradient_checkpointing else "off"
    out.print(f"[bold]{report.source}[/bold]  batch {args.batch} x {args.seq} tokens = {tokens:,} tokens per step; "
              f"{result.path} path, gradient checkpointing {checkpointing}, {result.optimizer}")
    c = result.components
    notes = {
        "weights_4bit": f"{count(sum(t.in_features * t.out_features for t in report.quantized_linears))} params in NF4",
        "unquantized_params": f"{count(report.unquantized_params())} params in "
                              f"{'fp32 (stock path upcast)' if result.path == 'stock' else 'the compute dtype'}",
        "adapters": f"{count(report.trainable_params)} params",
        "gradients": "same dtype as the adapters",
        "optimizer_states": f"{gib(result.paged_optimizer)} GiB of it paged (CUDA managed memory)",
        "activations": f"checkpointed; {gib(result.activations['without_checkpointing'])} GiB without"
                       if result.gradient_checkpointing else
                       f"no checkpointing; {gib(result.activations['with_checkpointing'])} GiB with",
        "logits": f"{LOGIT_BYTES} bytes x {report.config.get_text_config().vocab_size:,} vocabulary per token"
                  if hasattr(report.config, "get_text_config") else "",
    }
    rows = [[COMPONENT_LABELS[key], gib(value), notes.get(key, "")] for key, value in c.items()]
    rows.append(["", "", ""])
    rows += [[f"at {moment}", gib(value), "peak" if moment == result.peak_moment else ""]
             for moment, value in result.moments.items()]
    rows.append(["[bold]peak GPU memory[/bold]", f"[bold]{gib(result.peak)}[/bold]",
                 f"allocator peak {gib(result.allocator_peak)} + paged optimizer {gib(result.paged_optimizer)}"])
    out.print(table("Memory of one training step (GiB)", ["component", "GiB", "notes"], rows, {1}))
    for note in result.notes:
        out.print(f"[yellow]note:[/yellow] {note}")
    out.print()
    rows = [[row["gpu"], row["memory_gib"], "[green]yes[/green]" if row["fits"] else "[red]no[/red]",
             row["headroom_gib"], row["largest_batch"] or "-"] for row in fits]
    out.print(table(f"Fits on (keeping {RESERVE_BYTES // GIB} GiB for the CUDA context)",
                    ["GPU", "GiB", "fits", "headroom GiB", f"largest batch at seq {args.seq}"], rows, {1, 3, 4}))
    return 0
