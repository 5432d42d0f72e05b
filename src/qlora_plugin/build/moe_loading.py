"""Loading a mixture-of-experts model whose experts never sit on the GPU in 16 bits.

transformers 5 keeps the experts of Qwen2/3-MoE, Mixtral, gpt-oss, ... as fused 3-D parameters
(:mod:`qlora_plugin.core.experts`), which bitsandbytes does not quantize: a plain 4-bit
``from_pretrained`` puts every expert on the GPU in 16 bits (58 GB for Qwen3-30B-A3B) before
:func:`~qlora_plugin.build.moe_experts.quantize_experts` stores them in 4 bits. A single-process
CUDA load without a caller's ``device_map`` (:func:`experts_load_device`) goes another way:

1. **The map** (:func:`experts_device_map`): each fused experts module on ``"cpu"``, every
   other module on the GPU. No entry covers an experts module from above and there is no
   ``""`` entry: accelerate's ``dispatch_model`` moves the whole subtree of such an entry onto
   its device. transformers' bitsandbytes quantizer refuses ``"cpu"`` entries unless
   ``llm_int8_enable_fp32_cpu_offload=True`` (it then only leaves those modules unconverted,
   and fused experts hold no ``nn.Linear``); the flag is put back after the load.
2. **As the load runs**, a parameter registration hook (:data:`LOAD_HOOK_PATCH`) stores each
   experts module in 4 bits on the GPU as soon as transformers' loader has assigned its last
   parameter (copying one expert's matrix at a time), and frees its 16-bit weights: host memory
   holds about one experts module in 16 bits at a time.
3. **After the load**: a map of two devices made transformers hand the model to accelerate's
   ``dispatch_model``, which hooked every block, moved the offloaded experts to ``meta`` (their
   weights kept by the hooks), wrapped ``model.to``/``cuda`` and set ``hf_device_map``.
   :func:`undo_dispatch` removes all of it: the model is then what a ``{"": gpu}`` load leaves,
   no hooks and no ``hf_device_map``. The 4-bit experts take their modules' places; an experts
   module the hook did not store (hook off) is stored now, from host memory.

Outside the versions this was tested with (:data:`TRANSFORMERS_PATCH`, :data:`ACCELERATE_PATCH`)
the load is the plain one, after one warning.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qlora_plugin.build.moe_experts import is_fused_experts, may_quantize_experts, quantize_experts, quantize_module
from qlora_plugin.core import patches

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from qlora_plugin.build.context import RunContext
    from qlora_plugin.core.recipe import QLoRARecipe

TRANSFORMERS_PATCH = "transformers-bnb-experts-on-cpu"
ACCELERATE_PATCH = "accelerate-dispatch-undone"
LOAD_HOOK_PATCH = "torch-experts-load-hook"
EXPERTS_DEVICE = "cpu"
_OFFLOAD_NOTICE = "Some parameters are on the meta device because they were offloaded"  # accelerate's warning


@dataclass(frozen=True)
class ExpertsPlacement:
    """Where a load puts a model: ``device_map`` for from_pretrained, the experts' classes, the GPU they go to."""

    device: torch.device
    device_map: dict[str, Any]
    experts_classes: frozenset[type]


def experts_load_device(config: PretrainedConfig, context: RunContext, kwargs: dict[str, Any]) -> torch.device | None:
    """The GPU a load stores the experts on without holding them there in 16 bits, or None (the plain load).

    A single-process CUDA load (no FSDP, no DeepSpeed) with a bitsandbytes 4-bit config and no
    ``device_map`` from the caller, of a checkpoint that is not quantized already.
    """
    from transformers import BitsAndBytesConfig

    if context.device != "cuda" or context.launch.distributed or context.deepspeed or context.sharding:
        return None
    if kwargs.get("device_map") is not None or not torch.cuda.is_available():
        return None
    quantization = kwargs.get("quantization_config")
    if not isinstance(quantization, BitsAndBytesConfig) or not quantization.load_in_4bit:
        return None
    text_config = config.get_text_config(decoder=True)
    if getattr(config, "quantization_config", None) or getattr(text_config, "quantization_config", None):
        return None
    return torch.device("cuda", torch.cuda.current_device())


def experts_module_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s fused experts modules (those :func:`quantize_experts` stores in 4 bits)."""
    return [name for name, module in model.named_modules() if is_fused_experts(module)]


def experts_device_map(model: nn.Module, device: torch.device) -> dict[str, Any]:
    """A ``device_map`` for ``model`` (a meta model): each fused experts module on the CPU, all else on ``device``.

    Module names only, each the largest module holding no experts module (``"model.embed_tokens"``,
    ``"model.layers.0.self_attn"``, ``"model.layers.0.mlp.gate"``, ...), never an entry above an experts
    module and never ``""``. A tensor held directly by a module above the experts gets its own entry.
    ``device`` stays a ``torch.device`` (a map whose values are all ``"cpu"`` offloads nothing).
    """
    experts = set(experts_module_names(model))
    holders = {name.rsplit(".", index)[0] for name in experts for index in range(1, name.count(".") + 1)}
    holders.add("")
    device_map: dict[str, Any] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        if prefix in experts:
            device_map[prefix] = EXPERTS_DEVICE
            return
        if prefix not in holders:
            device_map[prefix] = device
            return
        for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            device_map[f"{prefix}.{name}" if prefix else name] = device
        for name, child in module.named_children():
            visit(child, f"{prefix}.{name}" if prefix else name)

    visit(model, "")
    return device_map


def plan_placement(meta: nn.Module, device: torch.device) -> ExpertsPlacement | None:
    """The placement of a load of ``meta``'s model onto ``device``, or None where it has no fused experts or
    this transformers/accelerate is outside the tested versions (then one warning: the plain load follows)."""
    names = experts_module_names(meta)
    if not names or not may_quantize_experts():
        return None
    if not (patches.allowed(TRANSFORMERS_PATCH) and patches.allowed(ACCELERATE_PATCH)):
        return None
    classes = frozenset(type(meta.get_submodule(name)) for name in names)
    return ExpertsPlacement(device, experts_device_map(meta, device), classes)


def load_with_experts_on_cpu(
    model_class: Any,
    path: str,
    recipe: QLoRARecipe,
    context: RunContext,
    placement: ExpertsPlacement,
    kwargs: dict[str, Any],
) -> PreTrainedModel:
    """``model_class.from_pretrained(path, **kwargs)`` with ``placement``'s map, its experts stored in 4 bits on its
    device and the model left as a plain single-device model (see the module docstring)."""
    quantization = copy.deepcopy(kwargs["quantization_config"])  # the caller's config keeps its own flag
    offload_flag = quantization.llm_int8_enable_fp32_cpu_offload
    quantization.llm_int8_enable_fp32_cpu_offload = True
    load_kwargs = {**kwargs, "device_map": placement.device_map, "quantization_config": quantization}
    as_loaded = ExpertsAsLoaded(placement.experts_classes, recipe, placement.device, context)
    hooked = LOAD_HOOK_PATCH not in patches.applied() and patches.apply(LOAD_HOOK_PATCH, lambda _: as_loaded)
    try:
        with _without_offload_notice():
            model = model_class.from_pretrained(path, **load_kwargs)
    finally:
        if hooked:
            patches.revert(LOAD_HOOK_PATCH)
    undo_dispatch(model)
    for holder in (model.config, getattr(model, "hf_quantizer", None)):
        stored = getattr(holder, "quantization_config", None)
        if stored is not None and hasattr(stored, "llm_int8_enable_fp32_cpu_offload"):
            stored.llm_int8_enable_fp32_cpu_offload = offload_flag
    streamed = as_loaded.put_in_place(model)
    after = quantize_experts(model, recipe, device=placement.device, context=context)
    check_single_device(model, placement.device)
    context.report(
        logging.INFO,
        "qlora: %d mixture-of-experts expert modules loaded on the CPU and stored in 4 bits on %s "
        "(%d as they were loaded, %d after the load)",
        streamed + after,
        placement.device,
        streamed,
        after,
    )
    return model


class ExpertsAsLoaded:
    """A parameter registration hook: each experts module of ``classes`` in 4 bits on ``device`` once it is loaded.

    transformers' loader assigns each parameter it loads (``setattr``); when the last one of an
    experts module arrives on the CPU, the module is quantized (one expert's matrix at a time copied
    to ``device``) and its 16-bit weights are freed. :meth:`put_in_place` then puts the 4-bit
    modules where their sources are, once the load has ended.
    """

    def __init__(self, classes: frozenset[type], recipe: QLoRARecipe, device: torch.device, context: RunContext):
        self.classes, self.recipe, self.device, self.context = classes, recipe, device, context
        self.stored: dict[int, tuple[nn.Module, nn.Module]] = {}  # id(source) -> (source, its 4-bit experts)

    def __call__(self, module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if type(module) not in self.classes or param is None or param.device.type != EXPERTS_DEVICE:
            return None
        if id(module) in self.stored:
            return None
        module._parameters[name] = param
        if any(value is not None and value.is_meta for value in module._parameters.values()):
            return None  # more of this module to come
        quantized = quantize_module(module, self.recipe, self.device, self.context)
        for value in module._parameters.values():
            if value is not None:
                value._is_hf_initialized = True  # type: ignore[attr-defined]  # transformers' mark: not re-initialised
        self.stored[id(module)] = (module, quantized)
        return module._parameters[name]  # the 16-bit weight's empty stand-in (the bias itself for a bias)

    def put_in_place(self, model: nn.Module) -> int:
        """Replace each source module in ``model`` by its 4-bit experts; how many were replaced."""
        count = 0
        for name, module in list(model.named_modules()):
            entry = self.stored.get(id(module))
            if entry is None or entry[0] is not module:
                continue
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, entry[1])
            count += 1
        self.stored.clear()
        return count


def undo_dispatch(model: nn.Module) -> None:
    """Remove what accelerate's ``dispatch_model`` left on ``model``: its hooks (the offloaded weights go back into
    their modules), the per-instance ``forward`` they leave behind, the wrapped ``to``/``cuda``, ``hf_device_map``."""
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(model, recurse=True)
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is getattr(
            type(module), "forward", None
        ):
            del module.__dict__["forward"]  # remove_hook_from_module sets the class's own forward per instance
    model.__dict__.pop("hf_device_map", None)
    left = [
        name for name, module in model.named_modules() if hasattr(module, "_hf_hook") or "_old_forward" in vars(module)
    ]
    left += [f"model.{name}" for name in ("to", "cuda") if name in model.__dict__]
    if left:
        raise RuntimeError(f"qlora: accelerate's dispatch left hooks on the loaded model: {left[:5]}")


def check_single_device(model: nn.Module, device: torch.device) -> None:
    """Raise unless every parameter and buffer of ``model`` is on ``device``."""
    elsewhere = [
        f"{name} ({tensor.device})"
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if tensor.device != device
    ]
    if elsewhere:
        raise RuntimeError(
            f"qlora: after loading, {len(elsewhere)} tensors are not on {device}: {', '.join(elsewhere[:5])}"
        )


@contextlib.contextmanager
def _without_offload_notice() -> Iterator[None]:
    """Without accelerate's warning that offloaded weights are on the meta device (true until :func:`undo_dispatch`)."""
    logger = logging.getLogger("accelerate.big_modeling")

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_OFFLOAD_NOTICE)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
