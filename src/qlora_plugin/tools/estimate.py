"""``qlora estimate``: the peak GPU memory of one QLoRA training step, from the config.

Everything is derived from the model's shapes (built on the meta device), the
recipe and a :class:`TrainingPath`; nothing is fitted to measurements. ``T`` is
the number of tokens in a micro-batch (batch x sequence length), ``c`` the
compute dtype's bytes (2 for bf16). A step is: forward and loss under bf16
autocast, backward, clipping, the optimizer step, gradients set to ``None``.

The path (:class:`TrainingPath`) says how the step runs:
  * ``stock``: PEFT's ``prepare_model_for_kbit_training``: embeddings, norms and
    an untied head upcast to float32, float32 adapters; the residual stream and
    MLP activations are float32 (bitsandbytes returns the dtype of its input).
  * ``fast``: the base stays in the compute dtype. Parameters: ``recompute``
    (``none``, ``full``: every decoder layer recomputed in backward, ``offload``:
    recomputed with its input parked in host memory), ``fused_loss`` (a chunked
    loss that never holds the full logits), ``kernels`` (fused LoRA over NF4,
    fused RMSNorm and SwiGLU that save less, and a paged AdamW that pages every
    state), ``adapter_dtype`` (float32 masters, or the compute dtype) and
    ``cached_constants`` (the 4-bit block constants kept decoded in float32) and
    ``tiled_mlp`` (with the kernels, steps of at least ``tiled_mlp_min_tokens``
    tokens run each MLP in slices of :data:`TILED_MLP_ROWS` tokens). Like training,
    the fast path reads ``QLORA_TILED_MLP`` and ``QLORA_OFFLOAD_KEEP_LAYERS`` from the
    environment unless the options set them.

Resident for the whole step
  * 4-bit weights: every linear layer but the output head (with a quality option, the
    targets less ``unquantized_modules``), packed two per byte, plus the constants of each
    block of ``blocksize`` (see :func:`qlora_plugin.tools.model_report.nf4_bytes`);
    and the fused experts of mixture-of-experts models, stored the same way one expert at
    a time (:func:`qlora_plugin.tools.model_report.experts_nf4_bytes`). LoRA on experts adds
    one A and B per expert; each routed copy of a token keeps its input and rank-``r``
    product per adapted expert parameter (:func:`expert_lora_bytes`), and the MLP terms
    below use ``num_experts_per_tok`` x the expert width.
  * Unquantized parameters (embeddings, untied head, norms, biases, linear layers a quality
    option keeps out of 4 bits): 4 bytes
    each on the stock path, ``c`` on the fast path.
  * Adapters, and once the step runs their gradients and optimizer states.
    ``paged_adamw_32bit`` keeps two float32 states per parameter; bitsandbytes
    pages (CUDA managed memory, outside PyTorch's allocator) the states of
    tensors of at least 100k elements, the kernels' optimizer pages all.

Activations, per token and decoder layer, counted as the tensors autograd saves
(the 4-bit matmul saves none of its input beyond what LoRA saves):
  * each adapted layer with input width ``d``: with dropout the mask (1 byte x
    ``d``) and the dropped input (``c`` x ``d``), or with the kernels (dropout drawn
    in Triton) the input and a 1-bit mask (``d`` / 8); without dropout the input
    itself; an input is shared by the layers that read the same tensor (q/k/v,
    gate/up, and o_proj with attention's output on the fast path); the rank-``r``
    product (``c`` x ``r``);
  * each norm: its input in float32 (4 x hidden), or with the fused kernel in
    ``c`` plus one float32 per token;
  * attention through SDPA's flash / memory-efficient kernels (no padding mask):
    q, k, v and the output in ``c`` bytes plus one float32 log-sum-exp per head;
  * a gated MLP: the gate output, its activation and the up output (3 x
    intermediate; 2 with the fused SwiGLU, which recomputes the activation),
    ``m`` bytes each: ``c`` fast, 4 stock;
  * compute-dtype copies of float32 adapters (autocast's, or the kernels'
    casts kept for backward): ``c`` x the trainable parameters.
  With ``full`` recompute only each layer's input (``a`` x hidden, ``a`` = 4
  stock, ``c`` fast) stays; with ``offload`` only the two layers in flight and the
  ``offload_keep_layers`` kept on the GPU (the others wait in pinned host memory:
  ``c`` x hidden per token each, reported as ``host_pinned``); one layer's
  activations come back during its backward. The first ``keep_mlp_layers``
  recomputed layers also keep their MLP's gate and up outputs (``2 c`` x
  intermediate per token each), unless the MLP runs tiled; the ``park_mlp_layers``
  before them keep theirs in pinned host memory (counted in ``host_pinned``), one
  layer's on its way back to the GPU at a time. With ``host_available`` (``--host-gib``),
  the inputs the host cannot pin stay on the GPU, split as training splits them.
  With the tiled MLP, a layer keeps only the MLP's input per token (nothing of
  gate, up, their product or down_proj's input); one slice of :data:`TILED_MLP_ROWS`
  tokens holds those, and their gradient, during the MLP's backward
  (4 x ``c`` x intermediate per slice token). The layer's attention backward, which
  the MLP's used to dwarf, becomes a moment of its own (:func:`attention_backward_bytes`).

Loss: transformers' loss takes the logits to float32 and saves float32
log-probabilities; its backward holds those, their gradient and the logits'
gradient at once: 12 bytes x vocabulary per token (the stock path also keeps a
bf16 copy of its float32 head). The fused loss computes the input gradient
during forward in chunks of ``next_pow2(T / ceil(vocab / hidden))`` rows: one
chunk of logits in ``c`` plus the hidden-size input gradient.

The allocator's peak is the largest of three moments: the loss's backward, the
backward of the last decoder layer, and the optimizer step. Paged optimizer
states come on top (:attr:`MemoryEstimate.peak`).

Several GPUs (:class:`Parallel`, ``--gpus N --strategy ddp|fsdp``), per GPU:
  * ``ddp``: everything above (each rank holds the whole model and its own micro-batch),
    plus DDP's gradient buckets: the reducer keeps one flat copy of every trainable
    gradient (adapter dtype; ``gradient_as_bucket_view`` off, as transformers leaves it),
    allocated when the model is wrapped and held for the whole step. One GPU: no DDP.
  * ``fsdp`` (FSDP2, each decoder layer its own unit, resharded after forward): the 4-bit
    weights, the unquantized parameters, the adapters, their gradients and the optimizer
    states (torch's AdamW, which the recipe trains with under FSDP) divided by N (rounded
    up); plus, during forward and backward, the parameters FSDP all-gathers: one decoder
    layer unsharded (its 4-bit weights, norms and adapters, and in backward its adapters'
    unsharded gradients before the reduce-scatter) and the root unit (embeddings, untied
    head, final norm), which FSDP2 keeps unsharded from forward through backward.
    Prefetching the next layer and the collectives' staging buffers are not counted.
    Activations and the loss are per GPU, counted without the fast path's fused layer kernels,
    which stay off under FSDP.
    Before the first step, sharding holds every rank's whole loaded replica (4-bit weights,
    unquantized parameters, adapters) and its new shards at once: accelerate keeps the loaded
    state dict while ``fully_shard`` copies each parameter's shard, and it does not move a
    4-bit model to ``meta`` first. That moment (``fsdp sharding``) is the peak for a model
    whose replica is large next to a step's activations (a 70B at 2,048 tokens).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from qlora_plugin.build.distributed import optimizer_under_fsdp
from qlora_plugin.core.environment import read_knobs
from qlora_plugin.core.errors import QLoRAConfigError, nearest
from qlora_plugin.fastpath.stash_plan import HOST_PIECE_BYTES, plan_stash
from qlora_plugin.fastpath.tiling_defaults import TILED_MLP_MIN_TOKENS, TILED_MLP_ROWS
from qlora_plugin.tools.inspection import analyze

if TYPE_CHECKING:
    from qlora_plugin.core.fields import RecipeSpec
    from qlora_plugin.core.recipe import QLoRARecipe
    from qlora_plugin.tools.model_report import ModelReport

_log = logging.getLogger("qlora_plugin")
GIB = 1024**3
MIB = 1024**2
PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages optimizer states of tensors at least this large
EIGHT_BIT_MIN_NUMEL = 4096  # bitsandbytes keeps smaller tensors' states in 32 bits
LOGIT_BYTES = 12  # float32 log-probabilities + their gradient + the logits' gradient
SHARED_INPUTS = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
ATTENTION_OUTPUT_READERS = {"o_proj", "out_proj", "dense"}
GATED_LEAVES = {"gate_proj", "gate_up_proj", "w1", "w3"}
PATHS = ("stock", "fast")
RECOMPUTE_MODES = ("none", "full", "offload")
ADAPTER_DTYPES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
# What `fast_path=True` does on CUDA once the kernels are in: fused LoRA over NF4,
# the fused loss, float32 adapter masters.
FAST_PATH_DEFAULTS: dict[str, Any] = {
    "kernels": True,
    "fused_loss": True,
    "adapter_dtype": "float32",
    "tiled_mlp": True,
}
IN_FLIGHT_OFFLOADED = 2  # layer inputs on the GPU with offloaded recompute: the one copied out, the one prefetched
MLP_LEAVES = {"gate_proj", "up_proj", "down_proj"}
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


@dataclass(frozen=True)
class TrainingPath:
    """How a training step runs, as far as memory is concerned (see the module docstring)."""

    name: str = "fast"
    recompute: str = "full"
    fused_loss: bool = True
    kernels: bool = True
    adapter_dtype: str = "float32"
    cached_constants: bool = False
    tiled_mlp: bool = True
    tiled_mlp_min_tokens: int = TILED_MLP_MIN_TOKENS
    offload_keep_layers: int = 0
    keep_mlp_layers: int = 0
    park_mlp_layers: int = 0
    host_available: int | None = None  # bytes the host can pin for offloaded inputs; None: no limit

    def __post_init__(self) -> None:
        if self.host_available is not None and (isinstance(self.host_available, bool) or self.host_available < 0):
            raise QLoRAConfigError(
                "--host-gib",
                self.host_available / GIB,
                "must be a number >= 0",
                "pass the host's available memory in GiB",
            )
        if self.host_available is not None and self.recompute != "offload":
            raise QLoRAConfigError(
                "--host-gib",
                self.host_available / GIB,
                "only applies to offloaded recompute",
                "add --recompute offload, or drop it",
            )
        if isinstance(self.tiled_mlp_min_tokens, bool) or self.tiled_mlp_min_tokens < 0:
            raise QLoRAConfigError(
                "QLORA_TILED_MLP", self.tiled_mlp_min_tokens, "must be a whole number >= 0", "pass 0 (never) or more"
            )
        if self.offload_keep_layers and self.recompute != "offload":
            raise QLoRAConfigError(
                "--offload-keep-layers",
                self.offload_keep_layers,
                "only applies to offloaded recompute",
                "add --recompute offload, or drop it",
            )
        if isinstance(self.offload_keep_layers, bool) or self.offload_keep_layers < 0:
            raise QLoRAConfigError(
                "--offload-keep-layers", self.offload_keep_layers, "must be a whole number >= 0", "pass 0 or more"
            )
        for flag, layers in (("--keep-mlp-layers", self.keep_mlp_layers), ("--park-mlp-layers", self.park_mlp_layers)):
            if isinstance(layers, bool) or layers < 0:
                raise QLoRAConfigError(flag, layers, "must be a whole number >= 0", "pass 0 or more")
            if layers and (self.recompute == "none" or not self.kernels):
                raise QLoRAConfigError(
                    flag,
                    layers,
                    "only applies to the fast path's kernels under recompute",
                    "add --recompute full or offload, or drop it",
                )
        if self.name not in PATHS:
            raise QLoRAConfigError(
                "--path", self.name, "is not a path" + nearest(self.name, PATHS), f"use one of {list(PATHS)}"
            )
        if self.recompute not in RECOMPUTE_MODES:
            raise QLoRAConfigError(
                "--recompute",
                self.recompute,
                "is not a recompute mode" + nearest(self.recompute, RECOMPUTE_MODES),
                f"use one of {list(RECOMPUTE_MODES)}",
            )
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise QLoRAConfigError(
                "--adapter-dtype", self.adapter_dtype, "is not a dtype this estimate knows", "use float32 or bfloat16"
            )
        if self.name == "stock":
            wrong = {
                "recompute": self.recompute == "offload",
                "fused_loss": self.fused_loss,
                "kernels": self.kernels,
                "cached_constants": self.cached_constants,
                "tiled_mlp": self.tiled_mlp,
                "adapter_dtype": ADAPTER_DTYPES[self.adapter_dtype] != 4,
            }
            for option, bad in wrong.items():
                if bad:
                    raise QLoRAConfigError(
                        f"--{option.replace('_', '-')}",
                        getattr(self, option),
                        "is a fast-path option; the stock path has float32 adapters, "
                        "transformers' loss and at most full recompute",
                        "drop it, or estimate --path fast",
                    )

    @property
    def adapter_bytes(self) -> int:
        return ADAPTER_DTYPES[self.adapter_dtype]

    def describe(self) -> str:
        if self.name == "stock":
            return f"stock path (PEFT's fp32 upcasts), recompute {self.recompute}"
        parts = [
            f"recompute {self.recompute}",
            "fused loss" if self.fused_loss else "full logits",
            "kernels" if self.kernels else "no kernels",
            f"{self.adapter_dtype} adapters",
        ]
        if self.cached_constants:
            parts.append("cached block constants")
        if self.kernels and not (self.tiled_mlp and self.tiled_mlp_min_tokens):
            parts.append("MLP never tiled")
        elif self.kernels and self.tiled_mlp_min_tokens != TILED_MLP_MIN_TOKENS:
            parts.append(f"MLP tiled from {self.tiled_mlp_min_tokens:,} tokens")
        return "fast path: " + ", ".join(parts)

    def tiles(self, tokens: int) -> bool:
        """Whether a step of ``tokens`` tokens runs its MLPs tiled (the fast path's kernels only)."""
        fast_kernels = self.name == "fast" and self.kernels and self.tiled_mlp
        return fast_kernels and 0 < self.tiled_mlp_min_tokens <= tokens


STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Parallel:
    """How many GPUs share the run, and how (see the module docstring): ``ddp`` replicates, ``fsdp`` shards."""

    gpus: int = 1
    strategy: str = "ddp"

    def __post_init__(self) -> None:
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 1:
            raise QLoRAConfigError(
                "--gpus", self.gpus, "must be a whole number of GPUs, at least 1", "pass --gpus 1 or more"
            )
        if self.strategy not in STRATEGIES:
            raise QLoRAConfigError(
                "--strategy",
                self.strategy,
                "is not a multi-GPU strategy this estimate knows" + nearest(str(self.strategy), STRATEGIES),
                f"pass --strategy ddp (replicas) or fsdp (sharded), one of {list(STRATEGIES)}",
            )

    @property
    def shards(self) -> int:
        """How many GPUs each parameter, gradient and optimizer state is divided over."""
        return self.gpus if self.strategy == "fsdp" else 1

    def describe(self) -> str:
        return "1 GPU" if self.gpus == 1 else f"{self.gpus} GPUs, {self.strategy.upper()}: per GPU"


def training_path(recipe: QLoRARecipe | RecipeSpec, name: str | None = None, **options: Any) -> TrainingPath:
    """The path ``recipe`` trains on (``name`` and ``options`` override; ``None`` values are ignored).

    ``recompute`` follows ``gradient_checkpointing`` (``full``, ``none``, or ``offload`` on the
    fast path); the fast path's other options default to :data:`FAST_PATH_DEFAULTS`, and the
    tiling threshold and the layers kept under offload to the environment training reads.
    """
    name = name or ("fast" if recipe.fast_path else "stock")
    checkpointing = recipe.gradient_checkpointing
    recompute = "offload" if checkpointing == "offload" and name == "fast" else "full" if checkpointing else "none"
    values: dict[str, Any] = {"recompute": recompute}
    if name == "fast":
        values.update(FAST_PATH_DEFAULTS)
    else:
        values.update(fused_loss=False, kernels=False, adapter_dtype="float32", tiled_mlp=False)
    values.update({key: value for key, value in options.items() if value is not None})
    if name == "fast":
        knobs = read_knobs()
        for problem in knobs.problems:
            _log.warning(problem)
        values.setdefault(
            "tiled_mlp_min_tokens",
            TILED_MLP_MIN_TOKENS if knobs.tiled_mlp_min_tokens is None else knobs.tiled_mlp_min_tokens,
        )
        if values["recompute"] == "offload":
            values.setdefault("offload_keep_layers", knobs.offload_keep_layers)
        if values["recompute"] != "none" and values.get("kernels", True):
            values.setdefault("keep_mlp_layers", knobs.keep_mlp_layers)
            values.setdefault("park_mlp_layers", knobs.park_mlp_layers)
    return TrainingPath(name=name, **values)


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
                "shared_expert_intermediate_size", default=0
            )
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
    path: TrainingPath
    optimizer: str
    components: dict[str, int]
    activations: dict[str, int]
    moments: dict[str, int]
    paged_optimizer: int
    notes: list[str] = field(default_factory=list)
    parallel: Parallel = field(default_factory=Parallel)
    host_pinned: int = 0  # layer inputs in pinned host memory (offloaded recompute)

    @property
    def allocator_peak(self) -> int:
        """The peak PyTorch's allocator sees (``torch.cuda.max_memory_allocated``)."""
        return max(self.moments.values())

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=self.moments.__getitem__)

    @property
    def peak(self) -> int:
        """Peak GPU memory of the step: the allocator's peak plus the paged optimizer states."""
        return self.allocator_peak + self.paged_optimizer

    def fits(self, gpu_mib: int) -> bool:
        return self.peak + RESERVE_BYTES <= gpu_mib * MIB

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "seq": self.seq,
            "batch": self.batch,
            "path": asdict(self.path),
            "optimizer": self.optimizer,
            "components": self.components,
            "activations": self.activations,
            "moments": self.moments,
            "paged_optimizer": self.paged_optimizer,
            "allocator_peak": self.allocator_peak,
            "peak_moment": self.peak_moment,
            "peak": self.peak,
            "notes": self.notes,
            "parallel": asdict(self.parallel),
            "host_pinned": self.host_pinned,
        }


def host_shortfall(path: TrainingPath, dims: Dimensions, bytes_per_hidden: int) -> int:
    """Offloaded layer inputs the host has no room for, which stay on the GPU: training's own split
    (:func:`qlora_plugin.fastpath.stash_plan.plan_stash`) of ``path.host_available``; 0 without a limit."""
    if path.recompute != "offload" or path.host_available is None:
        return 0
    offloaded = max(dims.layers - path.offload_keep_layers, 0)
    plan = plan_stash(
        offloaded,
        bytes_per_hidden * dims.hidden,
        host_available=path.host_available,
        host_total=path.host_available,
        gpu_free=1 << 62,  # the estimate reports the GPU's peak rather than refusing the step
        piece_bytes=HOST_PIECE_BYTES,
    )
    return plan.on_gpu


def estimate_memory(
    report: ModelReport, seq: int, batch: int, path: TrainingPath | None = None, parallel: Parallel | None = None
) -> MemoryEstimate:
    """The memory model of the module docstring, applied to ``report`` at ``batch`` x ``seq`` per GPU."""
    recipe = report.recipe
    path = path or training_path(recipe)
    parallel = parallel or Parallel()
    shards = parallel.shards
    sharded = shards > 1  # FSDP over several GPUs
    if sharded and path.kernels:
        path = replace(path, kernels=False, tiled_mlp=False)  # sharded layers run PEFT's forward, not the kernels
    dims = Dimensions.from_config(report.config)
    stock = path.name == "stock"
    c = 4 if recipe.compute_dtype == "float32" else 2
    a = m = 4 if stock else c  # residual stream and MLP activations
    frozen_bytes = 4 if stock else c
    adapter_bytes = path.adapter_bytes
    tokens = seq * batch

    trainable = report.trainable_params
    optimizer = recipe.optimizer
    if sharded:
        optimizer = optimizer_under_fsdp(optimizer)  # what the recipe trains with there: nothing paged
    optimizer_torch, optimizer_paged = optimizer_bytes(
        report.lora_tensor_sizes(), optimizer, adapter_bytes, page_all=path.kernels
    )
    optimizer_torch, optimizer_paged = math.ceil(optimizer_torch / shards), math.ceil(optimizer_paged / shards)
    quantized_params = sum(t.in_features * t.out_features for t in report.quantized_linears)
    whole = {
        "weights_4bit": report.quantized_bytes()
        + (4 * math.ceil(quantized_params / recipe.blocksize) if path.cached_constants else 0),
        "unquantized_params": report.unquantized_params() * frozen_bytes,
        "adapters": trainable * adapter_bytes,
        "gradients": trainable * adapter_bytes,
    }
    components = {key: math.ceil(value / shards) for key, value in whole.items()}
    components["optimizer_states"] = optimizer_torch + optimizer_paged
    resident = components["weights_4bit"] + components["unquantized_params"] + components["adapters"]
    gathered = gathered_grads = 0  # FSDP: unsharded for forward and backward (the module docstring)
    if parallel.strategy == "ddp" and parallel.gpus > 1:
        components["ddp_buckets"] = whole["gradients"]
        resident += components["ddp_buckets"]
    elif sharded:
        layers = max(Dimensions.from_config(report.config).layers, 1)
        root = root_params(report) * frozen_bytes
        layer_params = (whole["weights_4bit"] + whole["unquantized_params"] - root + whole["adapters"]) / layers
        gathered = root + math.ceil(layer_params)
        gathered_grads = math.ceil(whole["gradients"] / layers)
        components["fsdp_all_gather"] = gathered + gathered_grads

    tiled = path.tiles(tokens)
    per_layer = layer_activation_bytes(report, dims, path, c=c, a=a, m=m, tiled=tiled)
    adapter_copies = trainable * c if adapter_bytes > c else 0  # compute-dtype copies kept for backward
    final_norm = c * dims.hidden + 4 if path.kernels else 4 * dims.hidden
    rope = 2 * a * dims.head_dim
    inputs = 3 * 8  # input ids, labels, shifted labels (int64)
    stay = host_shortfall(path, dims, c * tokens)  # offloaded inputs the host cannot pin
    on_gpu = min(IN_FLIGHT_OFFLOADED + path.offload_keep_layers + stay, dims.layers)
    kept_inputs = {"none": 0, "full": dims.layers, "offload": on_gpu}
    recomputed = (kept_inputs[path.recompute] * a * dims.hidden + final_norm + rope + inputs) * tokens
    mlp_outputs = 2 * c * dims.intermediate * tokens  # one layer's gate and up outputs
    parking = 0 if tiled or path.recompute == "none" else min(path.park_mlp_layers, dims.layers)
    keeping = 0 if tiled or path.recompute == "none" else min(path.keep_mlp_layers, dims.layers - parking)
    kept_mlp = keeping * mlp_outputs  # held on the GPU for the recompute
    parked_mlp = parking * mlp_outputs  # in pinned host memory
    recomputed += kept_mlp + (mlp_outputs if parking else 0)  # one parked layer's on its way back
    full = (dims.layers * per_layer + final_norm + rope + inputs) * tokens + adapter_copies
    logits = loss_bytes(dims, path, tokens, c)
    activations = {
        "per_layer_per_token": per_layer,
        "with_full_recompute": (dims.layers * a * dims.hidden + final_norm + rope + inputs) * tokens,
        "with_offloaded_recompute": (kept_inputs["offload"] * a * dims.hidden + final_norm + rope + inputs) * tokens,
        "without_recompute": full,
        "kept_mlp_outputs": kept_mlp,
        "parked_mlp_outputs": parked_mlp,
        "loss": logits,
    }
    components["activations"] = full if path.recompute == "none" else recomputed
    components["loss"] = logits

    largest_weight = max(
        [t.in_features * t.out_features for t in report.quantized_linears]
        + [p.in_features * p.out_features for p in report.expert_params],  # one expert dequantized at a time
        default=0,
    )
    mlp_gradients = (1 if path.kernels else 3) * m * dims.intermediate  # the fused SwiGLU works in place
    working = (2 * a * dims.hidden + mlp_gradients) * tokens + c * largest_weight
    if tiled:  # one slice's gate, up, product and its gradient instead of the whole row's
        working = 2 * a * dims.hidden * tokens + c * largest_weight + 4 * c * dims.intermediate * TILED_MLP_ROWS
    if path.recompute == "none":
        layer_backward = full + working
    else:
        layer_backward = recomputed + per_layer * tokens + adapter_copies // max(dims.layers, 1) + working
    moments = {
        "loss backward": resident + optimizer_torch + components["activations"] + logits + gathered,
        "layer backward": resident
        + optimizer_torch
        + components["gradients"]
        + layer_backward
        + gathered
        + gathered_grads,
        "optimizer step": resident + optimizer_torch + components["gradients"],
    }
    if sharded:  # the loaded replica and its shards, together
        replica = whole["weights_4bit"] + whole["unquantized_params"] + whole["adapters"]
        moments["fsdp sharding"] = replica + math.ceil(replica / shards)
    if tiled:  # the MLP's backward no longer dominates: attention's, later in the same layer, may
        moments["attention backward"] = (
            resident
            + optimizer_torch
            + components["gradients"]
            + recomputed
            + attention_backward_bytes(dims, c, a) * tokens
            + gathered
            + gathered_grads
        )
    notes = []
    if recipe.use_dora:
        notes.append("DoRA's per-layer weight-norm temporaries are not modelled; expect more")
    if not report.linears or not dims.layers:
        notes.append("no decoder layers found; activations may be far off")
    host_pinned = 0
    if path.recompute == "offload":
        offloaded = max(dims.layers - path.offload_keep_layers - stay, 0)
        host_pinned = offloaded * c * dims.hidden * tokens  # every offloaded layer input is copied out
        notes.append(f"offloaded recompute keeps {host_pinned / GIB:.1f} GiB of layer inputs in pinned host memory")
        if stay:
            notes.append(f"the host has no room for {stay} layer inputs: they stay on the GPU (--host-gib)")
        elif path.host_available is None:
            notes.append("assumes the host can pin them all; --host-gib gives the training machine's available memory")
    if activations["parked_mlp_outputs"]:
        parked = activations["parked_mlp_outputs"]
        host_pinned += parked
        notes.append(f"{parked / GIB:.1f} GiB of MLP gate and up outputs parked in pinned host memory")
    if tiled:
        slices = math.ceil(tokens / TILED_MLP_ROWS)
        threshold = path.tiled_mlp_min_tokens
        notes.append(f"MLPs tiled: {slices} slices of {TILED_MLP_ROWS} tokens (from {threshold} tokens)")
    return MemoryEstimate(
        model=report.source,
        seq=seq,
        batch=batch,
        path=path,
        optimizer=optimizer,
        components=components,
        activations=activations,
        moments=moments,
        paged_optimizer=optimizer_paged,
        notes=notes,
        parallel=parallel,
        host_pinned=host_pinned,
    )


def root_params(report: ModelReport) -> int:
    """Unquantized parameters outside the repeated decoder layers (embeddings, untied head, final norm).

    A parameter is in a decoder layer when its name has a numeric part (``model.layers.3.``).
    """
    import re

    in_layers = sum(numel for name, numel in report.other_params.items() if re.search(r"\.\d+\.", name))
    return report.unquantized_params() - in_layers


def loss_bytes(dims: Dimensions, path: TrainingPath, tokens: int, c: int) -> int:
    """Bytes of the loss at its largest: full float32 logits, or one chunk with the fused loss."""
    if not path.fused_loss:
        head_copy = 2 * dims.vocab * dims.hidden if path.name == "stock" else 0
        return LOGIT_BYTES * dims.vocab * tokens + head_copy
    chunk = fused_loss_chunk(tokens, dims.vocab, dims.hidden)
    return c * chunk * dims.vocab + c * dims.hidden * tokens + 4 * tokens


def fused_loss_chunk(tokens: int, vocab: int, hidden: int) -> int:
    """Rows per chunk of the fused linear cross-entropy (Liger's rule: logits no larger than the input)."""
    rows = math.ceil(tokens / math.ceil(vocab / max(hidden, 1)))
    return min(1 << max(rows - 1, 0).bit_length(), tokens)


def layer_activation_bytes(
    report: ModelReport, dims: Dimensions, path: TrainingPath, *, c: int, a: int, m: int, tiled: bool = False
) -> int:
    """Bytes autograd saves per token in one decoder layer without recompute (``tiled``: the MLP tiled)."""
    recipe = report.recipe
    layers = max(dims.layers, 1)
    dropout = recipe.lora_dropout > 0
    fast = path.name == "fast"
    bit_masks = fast and path.kernels  # dropout drawn in the Triton kernels: the input and 1 bit per element
    lora: float = 0
    counted: set[tuple[str, int]] = set()
    for target in report.target_linears:
        parent, leaf = target.name.rsplit(".", 1) if "." in target.name else ("", target.name)
        key = (parent, target.in_features)
        shared = (fast and leaf in SHARED_INPUTS and key in counted) or (fast and leaf in ATTENTION_OUTPUT_READERS)
        counted.add(key)
        if tiled and leaf in MLP_LEAVES:  # the tiled MLP keeps its input (gate/up's, counted once) and nothing else
            lora += 0 if shared or leaf == "down_proj" else c * target.in_features
            continue
        if dropout and not bit_masks:
            lora += (1 + c) * target.in_features  # mask and dropped input
        else:
            lora += 0 if shared else c * target.in_features
            lora += target.in_features / 8 if dropout else 0
        lora += c * recipe.r
    lora += expert_lora_bytes(report, c)
    lora /= layers
    per_norm = c * dims.hidden + 4 if path.kernels else 4 * dims.hidden
    norms = per_norm * max(report.norm_count - 1, 0) / layers
    q, kv = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    attention = c * (2 * q + 2 * kv) + 4 * dims.heads
    gated = any(t.name.rsplit(".", 1)[-1] in GATED_LEAVES for t in report.linears) or any(
        p.name.rsplit(".", 1)[-1] in GATED_LEAVES for p in report.expert_params
    )
    mlp = 0 if tiled else ((2 if path.kernels else 3) if gated else 1) * m * dims.intermediate
    return int(lora + norms + attention + mlp)


def expert_lora_bytes(report: ModelReport, c: int) -> int:
    """Bytes per token, summed over the layers, that LoRA on fused MoE experts saves for backward.

    Each of a token's ``num_experts_per_tok`` routed copies keeps, per adapted expert
    parameter, its input row (``c`` x in) and the rank-``r`` product (``c`` x r).
    """
    if not report.target_expert_params:
        return 0
    text = report.config.get_text_config() if hasattr(report.config, "get_text_config") else report.config
    top_k = int(getattr(text, "num_experts_per_tok", 1) or 1)
    return sum(top_k * c * (p.in_features + report.recipe.r) for p in report.target_expert_params)


def attention_backward_bytes(dims: Dimensions, c: int, a: int) -> int:
    """Bytes per token alive while one decoder layer's attention runs backward (flash kernel, no mask).

    What the layer still keeps then (attention's saved q, k, v, output and log-sum-exp, the
    q/k/v projections' shared input and the input norm's statistics; the layer's input is
    counted with the recompute), the gradients of the residual stream and of attention's
    output, and the flash backward's own tensors: a float32 accumulator for the query
    gradient, key and value gradients per query head (grouped-query attention sums them
    afterwards) and the final query, key and value gradients.
    """
    q, kv = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    kept = c * (2 * q + 2 * kv) + 4 * dims.heads + c * dims.hidden + 4
    flowing = 2 * a * dims.hidden
    flash = 4 * q + (2 * c * q if kv < q else 0) + c * (q + 2 * kv)
    return kept + flowing + flash


def optimizer_bytes(sizes: list[int], optimizer: str, param_bytes: int, page_all: bool = False) -> tuple[int, int]:
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
        if optimizer.startswith("paged_") and (page_all or numel >= PAGED_MIN_NUMEL):
            paged += nbytes
        else:
            in_torch += nbytes
    return in_torch, paged


def estimate(
    model: str | os.PathLike[str],
    recipe: QLoRARecipe | RecipeSpec,
    seq: int,
    batch: int,
    path: TrainingPath | None = None,
    parallel: Parallel | None = None,
) -> MemoryEstimate:
    """Analyze ``model`` (config only) under ``recipe`` and estimate a step at ``batch`` x ``seq`` per GPU."""
    return estimate_memory(analyze(model, recipe), seq, batch, path, parallel)


BATCH_SEARCH_LIMIT = 1024  # the largest micro-batch searched for; a batch that reaches it is shown as ">= 1024"


def largest_batch(
    report: ModelReport,
    seq: int,
    gpu_mib: int,
    path: TrainingPath,
    limit: int = BATCH_SEARCH_LIMIT,
    parallel: Parallel | None = None,
) -> int:
    """The largest micro-batch per GPU at ``seq`` whose estimate fits in ``gpu_mib`` (0 if none; ``limit`` at most)."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        if estimate_memory(report, seq, middle, path, parallel).fits(gpu_mib):
            low = middle
        else:
            high = middle - 1
    return low


def gpu_table(
    report: ModelReport,
    seq: int,
    batch: int,
    path: TrainingPath,
    gpus: list[str] | None = None,
    parallel: Parallel | None = None,
) -> list[dict[str, Any]]:
    """For each GPU: whether the step fits, the headroom, and the largest micro-batch that fits (per GPU)."""
    result = estimate_memory(report, seq, batch, path, parallel)
    rows = []
    for key in gpus or list(GPUS):
        label, mib = GPUS[key]
        rows.append(
            {
                "gpu": key,
                "name": label,
                "memory_gib": round(mib * MIB / GIB, 1),
                "fits": result.fits(mib),
                "headroom_gib": round((mib * MIB - RESERVE_BYTES - result.peak) / GIB, 2),
                "largest_batch": (most := largest_batch(report, seq, mib, path, parallel=parallel)),
                "largest_batch_capped": most >= BATCH_SEARCH_LIMIT,  # the search stopped there: it may be larger
            }
        )
    return rows


COMPONENT_LABELS = {
    "weights_4bit": "4-bit weights + double-quant constants",
    "unquantized_params": "unquantized embeddings / head / norms",
    "adapters": "LoRA adapters",
    "gradients": "adapter gradients",
    "optimizer_states": "optimizer states",
    "activations": "activations",
    "loss": "logits and loss",
    "ddp_buckets": "DDP gradient buckets",
    "fsdp_all_gather": "FSDP all-gathered (unsharded) parameters",
}


def check_gpus(names: list[str] | None) -> list[str] | None:
    """Validate ``--gpu`` names."""
    for name in names or []:
        if name not in GPUS:
            raise QLoRAConfigError(
                "--gpu", name, "is not a GPU this table knows" + nearest(name, GPUS), f"use one of {list(GPUS)}"
            )
    return names
