"""The one registry of everything qlora-plugin replaces or calls inside other libraries.

Each entry names the part of another library the plugin relies on beyond its public
API (a private method, a per-instance ``forward``, a C entry point, a trainer
attribute), the versions it was tested on, and what happens instead outside them.
Code that touches such a part asks :func:`allowed` first; outside the tested range
that part of the plugin stays off, with one warning naming the package, its version,
the tested range and the fallback. Nothing here imports the libraries themselves.

``QLORA_UNTESTED_PATCHES=1`` turns the range check into a warning only (for trying a
new release); C entry points are still checked for their signature and never called
when it differs.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

_log = logging.getLogger("qlora_plugin")
FORCE_ENV = "QLORA_UNTESTED_PATCHES"


@dataclass(frozen=True)
class Patch:
    """One third-party internal the plugin depends on."""

    package: str  # the distribution whose internals are touched
    tested: str  # PEP 440 specifier: the versions this was tested on
    target: str  # what is replaced or called
    fallback: str  # what the plugin does instead outside ``tested``


PATCHES: dict[str, Patch] = {
    "peft-lora-layer-factory": Patch(
        "peft",
        ">=0.20,<0.22",
        "LoraConfig._register_custom_module: the recipe builds each LoRA layer (quantizes 16-bit targets to "
        "4 bits, arms the fast path)",
        "PEFT's own layers: a model loaded in 16 bits keeps 16-bit base layers, and the fast path is not armed",
    ),
    "peft-lora-4bit-forward": Patch(
        "peft",
        ">=0.20,<0.22",
        "the forward of each peft.tuners.lora.bnb.Linear4bit (fused LoRA over the 4-bit weight)",
        "PEFT's LoRA forward",
    ),
    "peft-param-wrapper-forward": Patch(
        "peft",
        ">=0.20,<0.22",
        "ParamWrapper.forward and ParamWrapper.merge (LoRA over target_parameters), wrapped: over 4-bit MoE experts "
        "each expert's low-rank update goes to its own tokens (no dense delta over all experts), and merging into "
        "4 bits is refused; other wrappers keep PEFT's; the wrappers nest by the class name 'ParamWrapper'",
        "MoE experts stay in 16 bits, with PEFT's own ParamWrapper LoRA on them",
    ),
    "bnb-quant-state": Patch(
        "bitsandbytes",
        ">=0.50,<0.51",
        "Params4bit.quant_state fields (absmax, state2, code, offset, blocksize) read by the fused LoRA kernels",
        "PEFT's LoRA forward over bitsandbytes' own 4-bit matmul",
    ),
    "bnb-dequantize-c-calls": Patch(
        "bitsandbytes",
        ">=0.50,<0.51",
        "bitsandbytes' C functions cdequantize_blockwise_* called directly through ctypes",
        "bitsandbytes.functional.dequantize_4bit",
    ),
    "bnb-managed-memory-c-calls": Patch(
        "bitsandbytes",
        ">=0.50,<0.51",
        "bitsandbytes' C functions cget_managed_ptr and cprefetch (the paged moments of the fused paged AdamW)",
        "bitsandbytes' PagedAdamW32bit",
    ),
    "bnb-cpu-weight-repack": Patch(
        "bitsandbytes",
        ">=0.50,<0.51",
        "Linear4bit.support_avx512bf16_for_cpu set to False on the layers the plugin trains, so an eval "
        "forward on a CPU with AVX512-BF16 does not repack the NF4 weight in place",
        "weights bitsandbytes repacked are read back through its own inverse conversion",
    ),
    "transformers-norm-mlp-forward": Patch(
        "transformers",
        ">=5.16,<5.25",
        "per-instance forward of Llama-style RMSNorm (weight, variance_epsilon) and SwiGLU MLP modules "
        "(gate_proj, up_proj, down_proj, act_fn); long rows run the MLP in slices of tokens (tiled MLP)",
        "the modules' own forwards",
    ),
    "transformers-fused-experts": Patch(
        "transformers",
        ">=5.16,<5.25",
        "fused MoE experts modules (use_experts_implementation: 3-D gate_up_proj/up_proj/down_proj, has_gate, "
        "has_bias, is_transposed, _apply_gate, act_fn; called as experts(hidden, top_k_index, top_k_weights)) "
        "replaced by the plugin's 4-bit experts",
        "MoE experts stay in 16 bits, with PEFT's own ParamWrapper LoRA on them",
    ),
    "transformers-rope-function": Patch(
        "transformers",
        ">=5.16,<5.25",
        "apply_rotary_pos_emb as the Llama/Mistral/Qwen2/Qwen3 attention forwards look it up (per instance)",
        "transformers' rotary embedding",
    ),
    "transformers-causal-lm-forward": Patch(
        "transformers",
        ">=5.16,<5.25",
        "per-instance forward of a causal LM (decoder at .model, output head from get_output_embeddings) for a "
        "training loss without logits",
        "the model's own loss from full logits",
    ),
    "trl-chunked-loss-forward": Patch(
        "trl",
        ">=1.9,<1.15",
        "the per-instance forward TRL's SFTTrainer puts on a model for loss_type='chunked_nll' (its default "
        "without Liger), replaced by the fast path's logit-free loss returning the same loss, token accuracy, "
        "entropy and token count",
        "TRL's chunked loss (float32 head GEMMs, recomputed in backward)",
    ),
    "transformers-checkpointing-layers": Patch(
        "transformers",
        ">=5.16,<5.25",
        "GradientCheckpointingLayer.gradient_checkpointing and _gradient_checkpointing_func (the recompute modes)",
        "the trainer's gradient checkpointing as configured",
    ),
    "transformers-decoder-layer-call": Patch(
        "transformers",
        ">=5.16,<5.25",
        "per-instance forward of the decoder layers (CUDA graph replay; hidden_states, attention_mask and "
        "position_embeddings arguments)",
        "the layers run eagerly",
    ),
    "transformers-trainer-optimizer-choice": Patch(
        "transformers",
        ">=5.16,<5.25",
        "Trainer.get_optimizer_cls_and_kwargs, wrapped: a model the recipe built, trained with "
        "optim='paged_adamw_32bit' on the fast path, gets the fused paged AdamW; any other model, what optim= says",
        "bitsandbytes' PagedAdamW32bit, as optim= says (optimizer_cls_and_kwargs=recipe.optimizer_cls_and_kwargs(args) "
        "still picks the fused one)",
    ),
    "transformers-attention-interface": Patch(
        "transformers",
        ">=5.16,<5.25",
        "an attention implementation registered with AttentionInterface/AttentionMaskInterface for packed "
        "(padding-free) batches",
        "transformers' sdpa attention with a block-diagonal mask over the packed row",
    ),
    "torch-varlen-attention": Patch(
        "torch",
        ">=2.11,<2.14",
        "torch.nn.attention.varlen.varlen_attn for packed sequences",
        "one scaled_dot_product_attention call per group of equal-length sequences",
    ),
    "torch-fsdp2-all-gather-bytes": Patch(
        "torch",
        ">=2.11,<2.15",  # the corruption and the fix seen on GPUs with 2.11; the wrapper's contract on CPUs to 2.14.1
        "torch.distributed.fsdp._fully_shard._fsdp_collectives._get_all_gather_input_metadatas, wrapped to "
        "answer uint8: FSDP2 all-gathers every unit as bytes, so bf16-stored 4-bit codes arrive unchanged",
        "FSDP2's own all-gather dtype, with one warning: on GPUs it can rewrite the packed codes that read as NaN",
    ),
    "liger-autograd-functions": Patch(
        "liger-kernel",
        ">=0.8.1,<0.9",
        "Liger's autograd functions (RMSNorm, SiLU-mul, RoPE, fused linear cross-entropy) called with their "
        "positional arguments",
        "the plain PyTorch reference of each function",
    ),
    "tqdm-open-bars": Patch(
        "tqdm",
        ">=4.60,<5",
        "tqdm.std.tqdm._instances: the open progress bars, closed before a failed run's last line",
        "a bar's final redraw at shutdown may print after the plugin's last line",
    ),
    "trainer-dataloader-config": Patch(
        "accelerate",
        ">=1.13,<1.16",
        "a built trainer's args.accelerator_config and accelerator.dataloader_config (non-blocking batch copy "
        "set after Axolotl created the trainer)",
        "the batch copy as the trainer configured it",
    ),
    "accelerate-partial-state": Patch(
        "accelerate",
        ">=1.13,<1.16",
        "PartialState._shared_state, read (never written) to learn whether accelerate's state already exists "
        "before asking it for the rank (asking creates it, and with it the process group)",
        "the rank and world size are read from the launcher's WORLD_SIZE and LOCAL_RANK only",
    ),
}


def installed_version(package: str) -> str | None:
    """The installed version of distribution ``package``, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def in_tested_range(name: str) -> bool:
    """True when the installed package of patch ``name`` is within its tested versions."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    patch = PATCHES[name]
    version = installed_version(patch.package)
    if version is None:
        return False
    try:
        return Version(Version(version).public) in SpecifierSet(patch.tested)
    except InvalidVersion:
        return False


@functools.cache
def allowed(name: str) -> bool:
    """Whether the plugin may use patch ``name`` here; outside its tested range, warn once and say no."""
    patch = PATCHES[name]
    if in_tested_range(name):
        return True
    version = installed_version(patch.package)
    what = f"{patch.package} {version}" if version else f"{patch.package} (not installed)"
    if version and os.environ.get(FORCE_ENV) == "1":
        _log.warning(
            "qlora: %s is outside the versions %s was tested on (%s); used anyway because %s=1",
            what,
            name,
            patch.tested,
            FORCE_ENV,
        )
        return True
    _log.warning(
        "qlora: %s left alone (%s): %s is outside the versions it was tested on (%s); instead: %s. "
        "Set %s=1 to try it anyway.",
        name,
        patch.target,
        what,
        patch.tested,
        patch.fallback,
        FORCE_ENV,
    )
    return False


def status() -> list[dict[str, str | bool | None]]:
    """Every patch with its package, installed version, tested range and whether it is in range."""
    return [
        {
            "name": name,
            "package": patch.package,
            "installed": installed_version(patch.package),
            "tested": patch.tested,
            "in_range": in_tested_range(name),
            "target": patch.target,
            "fallback": patch.fallback,
        }
        for name, patch in PATCHES.items()
    ]


_UNCHECKED = object()


def c_function(name: str, symbol: str, argtypes: Sequence[type] | None, restype: object = _UNCHECKED) -> object | None:
    """bitsandbytes' C function ``symbol`` when patch ``name`` is allowed and declared as expected.

    bitsandbytes declares its functions' ``argtypes`` (and some ``restype``) when it
    loads; the plugin's calls match those declarations (``argtypes=None``: the caller
    passes ctypes objects itself). A function declared otherwise could receive a
    truncated pointer, so it is never returned.
    """
    if not allowed(name):
        return None
    try:
        from bitsandbytes.cextension import lib

        function = getattr(lib, symbol)
    except (ImportError, AttributeError, RuntimeError):
        return None
    declared = getattr(function, "argtypes", None)
    declared = None if declared is None else list(declared)
    restype_ok = restype is _UNCHECKED or getattr(function, "restype", None) is restype
    if declared != (None if argtypes is None else list(argtypes)) or not restype_ok:
        _warn_signature(symbol)
        return None
    return function


@functools.cache
def _warn_signature(symbol: str) -> None:
    _log.warning("qlora: bitsandbytes' %s is not declared as the plugin expects; its direct call is off", symbol)
