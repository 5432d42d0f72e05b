"""The one registry of everything qlora-plugin replaces or calls inside other libraries.

Each entry names the part of another library the plugin relies on beyond its public
API (a private method, a per-instance ``forward``, a C entry point, a trainer
attribute, a process-wide hook), the versions it was tested on, and what happens
instead outside them. Code that touches such a part asks :func:`allowed` first;
outside the tested range that part of the plugin stays off, with one warning naming
the package, its version, the tested range and the fallback.

An entry that changes the whole process (a class's method, a module's function, a
global hook, a registration, ``sys.excepthook``) also owns how the change is made and
undone: its :class:`Install`. The layer that needs the change calls :func:`apply` with
a function that builds the replacement; the gate is asked, the change is made once per
process, and :func:`revert` (or :func:`revert_all`) puts back exactly what was there.
Nothing here imports the libraries at module level: an install finds its target by name
when it is applied.

``QLORA_UNTESTED_PATCHES=1`` turns the range check into a warning only (for trying a
new release); C entry points are still checked for their signature and never called
when it differs.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import platform
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from qlora_plugin.core.environment import UNTESTED_PATCHES, untested_patches_allowed

_log = logging.getLogger("qlora_plugin")
FORCE_ENV = UNTESTED_PATCHES
# Given what is in place now (None for a registration), returns what to put there.
Build = Callable[[Any], Any]
_ABSENT = object()


class Install(ABC):
    """How one process-wide change is put in place and undone."""

    @property
    @abstractmethod
    def applied(self) -> bool:
        """True while the change is in place."""

    @abstractmethod
    def apply(self, build: Build) -> bool:
        """Put ``build(...)`` in place; False (nothing changed) where the target does not exist."""

    @abstractmethod
    def revert(self) -> None:
        """Put back what was there before :meth:`apply` (a no-op when nothing is applied)."""


def resolve(path: str) -> Any:
    """The object at ``"module:Attribute.attribute"`` (or the module itself, without a colon)."""
    module_name, _, attributes = path.partition(":")
    found: Any = importlib.import_module(module_name)
    for name in filter(None, attributes.split(".")):
        found = getattr(found, name)
    return found


class AttributeSwap(Install):
    """``owner.attribute`` replaced by ``build(current value)``; reverting restores the exact original.

    ``static``: the attribute is a static method of a class (the replacement is made one too).
    """

    def __init__(self, owner: str, attribute: str, static: bool = False) -> None:
        self.owner, self.attribute, self.static = owner, attribute, static
        self._undo: tuple[Any, Any] | None = None

    @property
    def applied(self) -> bool:
        return self._undo is not None

    def apply(self, build: Build) -> bool:
        try:
            owner = resolve(self.owner)
        except (ImportError, AttributeError):
            return False
        current = getattr(owner, self.attribute, None)
        if current is None:
            return False
        saved = vars(owner).get(self.attribute, _ABSENT)
        replacement = build(current)
        setattr(owner, self.attribute, staticmethod(replacement) if self.static else replacement)
        self._undo = (owner, saved)
        return True

    def revert(self) -> None:
        if self._undo is None:
            return
        owner, saved = self._undo
        if saved is _ABSENT:
            delattr(owner, self.attribute)
        else:
            setattr(owner, self.attribute, saved)
        self._undo = None


class AttributesSwap(Install):
    """Several attributes of one owner replaced together: ``build({name: current})`` returns ``{name: new}``."""

    def __init__(self, owner: str, *attributes: str) -> None:
        self.owner, self.attributes = owner, attributes
        self._undo: tuple[Any, dict[str, Any]] | None = None

    @property
    def applied(self) -> bool:
        return self._undo is not None

    def apply(self, build: Build) -> bool:
        try:
            owner = resolve(self.owner)
            current = {name: getattr(owner, name) for name in self.attributes}
        except (ImportError, AttributeError):
            return False
        saved = {name: vars(owner).get(name, _ABSENT) for name in self.attributes}
        for name, replacement in build(current).items():
            setattr(owner, name, replacement)
        self._undo = (owner, saved)
        return True

    def revert(self) -> None:
        if self._undo is None:
            return
        owner, saved = self._undo
        for name, value in saved.items():
            if value is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
        self._undo = None


class HookRegistration(Install):
    """A process-wide hook ``build(None)`` handed to ``register``.

    Undone through the handle ``register`` returns (torch's hooks), or by ``unregister``.
    """

    def __init__(self, register: str, unregister: str | None = None) -> None:
        self.register, self.unregister = register, unregister
        self._undo: tuple[Any, Any] | None = None

    @property
    def applied(self) -> bool:
        return self._undo is not None

    def apply(self, build: Build) -> bool:
        try:
            register = resolve(self.register)
        except (ImportError, AttributeError):
            return False
        hook = build(None)
        self._undo = (hook, register(hook))
        return True

    def revert(self) -> None:
        if self._undo is None:
            return
        hook, handle = self._undo
        if self.unregister is None:
            handle.remove()
        else:
            resolve(self.unregister)(hook)
        self._undo = None


class NamedRegistration(Install):
    """Entries under one key in transformers' registries (``AttentionInterface`` and the like).

    ``build(None)`` returns ``(key, functions)``, one function per registry in ``registries``;
    reverting removes the key again (or restores what it named before).
    """

    def __init__(self, *registries: str) -> None:
        self.registries = registries
        self._undo: list[tuple[Any, str, Any]] | None = None

    @property
    def applied(self) -> bool:
        return self._undo is not None

    def apply(self, build: Build) -> bool:
        try:
            registries = [resolve(path) for path in self.registries]
        except (ImportError, AttributeError):
            return False
        key, functions = build(None)
        self._undo = []
        for registry, function in zip(registries, functions, strict=True):
            self._undo.append((registry, key, registry._global_mapping.get(key, _ABSENT)))
            registry.register(key, function)
        return True

    def revert(self) -> None:
        for registry, key, saved in reversed(self._undo or []):
            if saved is _ABSENT:
                registry._global_mapping.pop(key, None)
            else:
                registry._global_mapping[key] = saved
        self._undo = None


@dataclass(frozen=True)
class Patch:
    """One third-party internal the plugin depends on."""

    package: str  # the distribution whose internals are touched ("python": the interpreter)
    tested: str  # PEP 440 specifier: the versions this was tested on
    target: str  # what is replaced or called
    fallback: str  # what the plugin does instead outside ``tested``
    install: Install | None = None  # for a change to the whole process: how it is made and undone


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
        AttributesSwap("peft.tuners.lora.layer:ParamWrapper", "forward", "merge"),
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
        ">=5.16,<5.26",
        "per-instance forward of Llama-style RMSNorm (weight, variance_epsilon) and SwiGLU MLP modules "
        "(gate_proj, up_proj, down_proj, act_fn); long rows run the MLP in slices of tokens (tiled MLP)",
        "the modules' own forwards",
    ),
    "transformers-fused-experts": Patch(
        "transformers",
        ">=5.16,<5.26",
        "fused MoE experts modules (use_experts_implementation: 3-D gate_up_proj/up_proj/down_proj, has_gate, "
        "has_bias, is_transposed, _apply_gate, act_fn; called as experts(hidden, top_k_index, top_k_weights)) "
        "replaced by the plugin's 4-bit experts",
        "MoE experts stay in 16 bits, with PEFT's own ParamWrapper LoRA on them",
    ),
    "transformers-bnb-experts-on-cpu": Patch(
        "transformers",
        ">=5.16,<5.18",
        "from_pretrained with a bitsandbytes 4-bit config and a device_map that puts each fused MoE experts "
        "module on 'cpu' and every other module on the GPU: the quantizer accepts it with "
        "llm_int8_enable_fp32_cpu_offload=True (put back after the load), the loader assigns each parameter "
        "through setattr, one at a time, and a map of two devices goes to accelerate's dispatch_model",
        "the experts load onto the GPU in 16 bits and are stored in 4 bits after the load (its GPU peak holds "
        "every expert in 16 bits)",
    ),
    "accelerate-dispatch-undone": Patch(
        "accelerate",
        ">=1.13,<1.17",
        "what dispatch_model leaves on a model whose experts it offloaded to the CPU (AlignDevicesHook on each "
        "block, the experts' weights held by their hooks, the wrapped to/cuda, hf_device_map), removed after "
        "the load with remove_hook_from_module: the model is then a plain single-GPU model",
        "the experts load onto the GPU in 16 bits and are stored in 4 bits after the load (its GPU peak holds "
        "every expert in 16 bits)",
    ),
    "torch-experts-load-hook": Patch(
        "torch",
        ">=2.4,<3",
        "torch.nn.modules.module.register_module_parameter_registration_hook: one hook, installed while a MoE "
        "model loads with its experts on the CPU, that stores each experts module in 4 bits on the GPU as soon "
        "as its last parameter is loaded (and frees its 16-bit weights); removed when the load ends",
        "the load keeps every expert in 16 bits in host memory, and stores them in 4 bits on the GPU after it",
        HookRegistration("torch.nn.modules.module:register_module_parameter_registration_hook"),
    ),
    "transformers-rope-function": Patch(
        "transformers",
        ">=5.16,<5.26",
        "apply_rotary_pos_emb as the Llama/Mistral/Qwen2/Qwen3 attention forwards look it up (per instance)",
        "transformers' rotary embedding",
    ),
    "transformers-causal-lm-forward": Patch(
        "transformers",
        ">=5.16,<5.26",
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
    "trl-fused-head-forward": Patch(
        "trl",
        ">=1.15,<1.17",
        "the per-instance forward TRL's SFTTrainer puts on a model with add_fused_lm_head (its settings read from "
        "the forward's closure: temperature 1, no fp32 head, no soft-capping or logit scale), whose "
        "fused_lm_head=True calls are answered by the fast path's logit-free per-token log-probabilities, "
        "entropy and top-1 hits; every other call goes to TRL's forward",
        "TRL's fused LM head",
    ),
    "transformers-checkpointing-layers": Patch(
        "transformers",
        ">=5.16,<5.26",
        "GradientCheckpointingLayer.gradient_checkpointing and _gradient_checkpointing_func (the recompute modes)",
        "the trainer's gradient checkpointing as configured",
    ),
    "transformers-decoder-layer-call": Patch(
        "transformers",
        ">=5.16,<5.26",
        "per-instance forward of the decoder layers (CUDA graph replay; hidden_states, attention_mask and "
        "position_embeddings arguments)",
        "the layers run eagerly",
    ),
    "transformers-trainer-optimizer-choice": Patch(
        "transformers",
        ">=5.16,<5.26",
        "Trainer.get_optimizer_cls_and_kwargs, wrapped: a model the recipe built, trained with "
        "optim='paged_adamw_32bit' on the fast path, gets the fused paged AdamW; any other model, what optim= says",
        "bitsandbytes' PagedAdamW32bit, as optim= says (optimizer_cls_and_kwargs=recipe.optimizer_cls_and_kwargs(args) "
        "still picks the fused one)",
        AttributeSwap("transformers:Trainer", "get_optimizer_cls_and_kwargs", static=True),
    ),
    "transformers-attention-interface": Patch(
        "transformers",
        ">=5.16,<5.26",
        "an attention implementation registered with AttentionInterface/AttentionMaskInterface for packed "
        "(padding-free) batches",
        "transformers' sdpa attention with a block-diagonal mask over the packed row",
        NamedRegistration("transformers:AttentionInterface", "transformers.masking_utils:AttentionMaskInterface"),
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
        AttributeSwap("torch.distributed.fsdp._fully_shard._fsdp_collectives", "_get_all_gather_input_metadatas"),
    ),
    # torch's public global hooks (since torch 2.0): the range is the package's own torch floor
    "torch-first-forward-hook": Patch(
        "torch",
        ">=2.4,<3",
        "torch.nn.modules.module.register_module_forward_pre_hook: one hook, installed while a model of the "
        "recipe's waits for its first training forward (the fast path goes on there) and removed when none waits",
        "the fast path stays off",
        HookRegistration("torch.nn.modules.module:register_module_forward_pre_hook"),
    ),
    "torch-experts-check-hook": Patch(
        "torch",
        ">=2.4,<3",
        "torch.nn.modules.module.register_module_forward_pre_hook: one hook, installed while a PEFT model built "
        "with a recipe waits for its first training forward, where its MoE experts are stored in 4 bits and "
        "checked against lora_on_experts; removed when none waits",
        "the experts are checked at the trainer's on_train_begin only (recipe.callbacks())",
        HookRegistration("torch.nn.modules.module:register_module_forward_pre_hook"),
    ),
    "torch-optimizer-step-hook": Patch(
        "torch",
        ">=2.4,<3",
        "torch.optim.optimizer.register_optimizer_step_pre_hook: at the first step of each optimizer over the "
        "recipe's LoRA layers, one line saying which optimizer runs",
        "no line about the optimizer",
        HookRegistration("torch.optim.optimizer:register_optimizer_step_pre_hook"),
    ),
    "python-excepthook": Patch(
        "python",
        ">=3.11,<4",
        "sys.excepthook, wrapped by the Axolotl plugin: an uncaught recipe error ends the process with one line",
        "the traceback alone",
        AttributeSwap("sys", "excepthook"),
    ),
    "python-atexit-checkpoints": Patch(
        "python",
        ">=3.11,<4",
        "atexit: at exit, a checkpoint the trainer began but never reported saved is removed, with one line "
        "naming the checkpoint to resume from",
        "an incomplete checkpoint stays until the next trainer sets it aside",
        HookRegistration("atexit:register", unregister="atexit:unregister"),
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
        ">=1.13,<1.17",
        "a built trainer's args.accelerator_config and accelerator.dataloader_config (non-blocking batch copy "
        "set after Axolotl created the trainer)",
        "the batch copy as the trainer configured it",
    ),
    "accelerate-partial-state": Patch(
        "accelerate",
        ">=1.13,<1.17",
        "PartialState._shared_state, read (never written) to learn whether accelerate's state already exists "
        "before asking it for the rank (asking creates it, and with it the process group)",
        "the rank and world size are read from the launcher's WORLD_SIZE and LOCAL_RANK only",
    ),
}


def installed_version(package: str) -> str | None:
    """The installed version of distribution ``package`` (``"python"``: the interpreter's), or None."""
    if package == "python":
        return platform.python_version()
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def in_tested_range(name: str) -> bool:
    """True when the installed package of patch ``name`` is within its tested versions."""
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
    if version and untested_patches_allowed():
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


def apply(name: str, build: Build) -> bool:
    """Make the process-wide change of patch ``name`` once: True while it is in place.

    ``build`` gets what is in place now (None for a registration) and returns the
    replacement. False where the patch is outside its tested range or its target is missing.
    """
    install = _install_of(name)
    if install.applied:
        return True
    return allowed(name) and install.apply(build)


def revert(name: str) -> None:
    """Undo the process-wide change of patch ``name`` (a no-op when it is not in place)."""
    _install_of(name).revert()


def revert_all() -> None:
    """Undo every process-wide change in place."""
    for name in applied():
        revert(name)


def applied() -> list[str]:
    """The patches whose process-wide change is in place now."""
    return [name for name, patch in PATCHES.items() if patch.install is not None and patch.install.applied]


def installs() -> list[str]:
    """Every patch that changes the whole process (has an :class:`Install`)."""
    return [name for name, patch in PATCHES.items() if patch.install is not None]


def _install_of(name: str) -> Install:
    install = PATCHES[name].install
    if install is None:
        raise ValueError(f"patch {name!r} changes no process-wide state; the installs are {installs()}")
    return install


def status() -> list[dict[str, str | bool | None]]:
    """Every patch with its package, installed version, tested range, whether it is in range and applied."""
    return [
        {
            "name": name,
            "package": patch.package,
            "installed": installed_version(patch.package),
            "tested": patch.tested,
            "in_range": in_tested_range(name),
            "target": patch.target,
            "fallback": patch.fallback,
            "applied": patch.install is not None and patch.install.applied,
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
