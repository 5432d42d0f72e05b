"""Mixture-of-experts experts as data: where a model keeps them, their shapes, what the recipe does to them.

transformers 5 stores the experts of Qwen2/3-MoE, Mixtral, gpt-oss, DeepSeek-V2/V3, OLMoE
and most other MoE families as fused 3-D parameters of one module per layer
(``mlp.experts.gate_up_proj`` of shape ``(experts, 2 * intermediate, hidden)`` and
``mlp.experts.down_proj``; gpt-oss stores them transposed, ``(experts, in, out)``). They are
no ``nn.Linear``: bitsandbytes does not quantize them and PEFT's ``all-linear`` does not
adapt them. This module finds them (on a real model, on the meta device, or behind PEFT's
``ParamWrapper`` layers) and names the parameters LoRA targets through PEFT's
``target_parameters``. Routers (``gate``, ``router``) hold 2-D weights and are never
experts. Nothing here imports torch at module level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.patches import allowed
from qlora_plugin.core.targets import VISION_PARTS

if TYPE_CHECKING:
    from torch import nn

# The fused expert projections LoRA adapts, in the order transformers defines them.
# ``up_proj`` is the input projection of experts without a gate (``has_gate=False``).
EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")
QUANTIZED_MARK = "qlora_quantized_experts"  # set on the plugin's 4-bit experts module (qlora_plugin.build)
WRAPPER_CLASS = "ParamWrapper"  # PEFT's LoRA layer over one targeted parameter (nested, one per parameter)


@dataclass(frozen=True)
class ExpertParam:
    """One fused expert parameter: its full name and each expert's matrix (``in_features`` -> ``out_features``)."""

    name: str
    num_experts: int
    in_features: int
    out_features: int

    @property
    def numel(self) -> int:
        return self.num_experts * self.in_features * self.out_features


@dataclass
class ExpertsModule:
    """The fused experts of one MoE layer."""

    name: str  # the module's name, without PEFT's ``base_layer`` parts
    num_experts: int
    params: list[ExpertParam]
    quantized: bool = False  # stored in 4 bits by the plugin
    adapted: set[str] = field(default_factory=set)  # full names of the parameters carrying LoRA


def unwrapped_name(name: str) -> str:
    """``name`` without PEFT's ``.base_layer`` parts (``mlp.experts.base_layer`` -> ``mlp.experts``)."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def find_experts(model: nn.Module) -> list[ExpertsModule]:
    """Every fused experts module of ``model``, in module order (vision parts left out)."""
    found: dict[str, ExpertsModule] = {}
    adapters: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        if type(module).__name__ == WRAPPER_CLASS and hasattr(module, "parameter_name"):
            owner = unwrapped_name(name)
            adapters.setdefault(owner, set()).add(f"{owner}.{module.parameter_name}")
            continue
        if any(part in VISION_PARTS for part in name.split(".")):
            continue
        params = expert_params(module, unwrapped_name(name))
        if params:
            owner = unwrapped_name(name)
            found[owner] = ExpertsModule(
                owner, params[0].num_experts, params, quantized=bool(getattr(module, QUANTIZED_MARK, False))
            )
    for owner, names in adapters.items():
        if owner in found:
            found[owner].adapted = names
    return list(found.values())


def expert_params(module: nn.Module, prefix: str) -> list[ExpertParam]:
    """The fused expert parameters ``module`` holds itself (not its children), with each expert's shape."""
    logical = getattr(module, "expert_shapes", None)  # the plugin's 4-bit module: shapes as transformers had them
    transposed = bool(getattr(module, "is_transposed", False))
    found = []
    for leaf in EXPERT_PARAMS:
        if isinstance(logical, dict) and leaf in logical:
            shape = tuple(logical[leaf])
        else:
            param = module._parameters.get(leaf)
            if param is None or param.dim() != 3:
                continue
            shape = tuple(param.shape)
        experts, first, second = (int(size) for size in shape)
        in_features, out_features = (first, second) if transposed else (second, first)
        found.append(ExpertParam(f"{prefix}.{leaf}" if prefix else leaf, experts, in_features, out_features))
    return found


def expert_target_parameters(model: nn.Module) -> list[str]:
    """The full names of the expert parameters LoRA targets on ``model`` (PEFT's ``target_parameters``)."""
    return [param.name for experts in find_experts(model) for param in experts.params]


def is_moe(model: nn.Module) -> bool:
    """True if ``model`` has fused experts."""
    return bool(find_experts(model))


def check_experts(model: nn.Module, recipe: Any) -> None:
    """Refuse to train ``model`` where its experts would silently stay in 16 bits or without the adapters asked for.

    Experts left in 16 bits because this transformers or PEFT is outside the versions the 4-bit
    experts were tested with are allowed: that fallback was announced by one warning.
    """
    experts = find_experts(model)
    if not experts:
        return
    in_16_bits = [module for module in experts if not module.quantized]
    supported = allowed("transformers-fused-experts") and allowed("peft-param-wrapper-forward")
    if in_16_bits and supported:
        params = sum(param.numel for module in in_16_bits for param in module.params)
        raise QLoRAConfigError(
            "model",
            type(model).__name__,
            f"{len(in_16_bits)} of its {len(experts)} mixture-of-experts expert modules ({params:,} parameters) "
            "would train in 16 bits, not 4",
            "load it with recipe.load_model(path), or pass peft_config=qlora_recipe(model=path) so the experts are "
            "quantized as PEFT wraps them",
        )
    if getattr(recipe, "lora_on_experts", False):
        bare = [module for module in experts if not module.adapted]
        if bare:
            raise QLoRAConfigError(
                "lora_on_experts",
                True,
                f"{len(bare)} of the {len(experts)} mixture-of-experts expert modules carry no LoRA adapter "
                f"(e.g. {bare[0].name}): the recipe was not resolved on this model",
                "pass peft_config=qlora_recipe(..., model=<path or model>) (or recipe.resolve(model)), or set "
                "lora_on_experts=False to train LoRA on the linear layers only",
            )
