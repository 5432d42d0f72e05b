"""The facts about one model under one recipe that ``inspect``, ``estimate`` and ``check`` use.

:class:`ModelReport` is built either from a model (:mod:`~qlora_plugin.tools.inspection`,
on the meta device) or from a config file alone (:mod:`~qlora_plugin.tools.config_layers`).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qlora_plugin.core.fields import quantizes_targets_itself
from qlora_plugin.core.model_limits import check_sequence_length, rank_warnings
from qlora_plugin.core.targets import ROUTER_NAMES, VISION_PARTS, user_excluded

if TYPE_CHECKING:
    from qlora_plugin.core.experts import ExpertParam, ExpertsModule
    from qlora_plugin.core.fields import RecipeSpec
    from qlora_plugin.core.recipe import QLoRARecipe

ALLOCATION = 512  # PyTorch's CUDA caching allocator rounds every block up to this
LAYER_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


@dataclass(frozen=True)
class Linear:
    """One linear layer: its full name and shape (``in_features`` -> ``out_features``)."""

    name: str
    in_features: int
    out_features: int
    bias: bool


@dataclass
class ModelReport:
    """The facts about one model under one recipe that ``inspect`` and ``estimate`` use."""

    source: str
    architecture: str
    model_type: str
    config: Any
    recipe: QLoRARecipe | RecipeSpec
    linears: list[Linear]
    targets: list[str]
    skipped: dict[str, str]
    heads: set[str]
    other_params: dict[str, int]  # name -> numel of every parameter outside the linear layers' weights
    tied_head: bool
    norm_count: int = 0  # normalization layers, the final one included
    layer_count: int = 0
    groups: list[dict[str, Any]] = field(default_factory=list)
    experts: list[ExpertsModule] = field(default_factory=list)  # fused MoE experts (qlora_plugin.core.experts)
    expert_targets: list[str] = field(default_factory=list)  # expert parameters with LoRA (target_parameters)
    experts_4bit: bool = True  # the plugin stores the experts in 4 bits (tested transformers and PEFT)

    # -- mixture-of-experts experts ------------------------------------------------

    @property
    def expert_params(self) -> list[ExpertParam]:
        return [param for module in self.experts for param in module.params]

    @property
    def target_expert_params(self) -> list[ExpertParam]:
        targets = set(self.expert_targets)
        return [param for param in self.expert_params if param.name in targets]

    def expert_bytes(self) -> int:
        """Bytes of the experts: 4-bit codes and constants as the plugin stacks them, else 2 bytes a weight."""
        if not self.experts_4bit:
            return 0
        return sum(
            experts_nf4_bytes(
                p.num_experts, p.in_features * p.out_features, self.recipe.double_quant, self.recipe.blocksize
            )
            for p in self.expert_params
        )

    def expert_summary(self) -> dict[str, Any]:
        """Counts for ``inspect``: expert modules and parameters, how many in 4 bits and how many with adapters."""
        params = self.expert_params
        quantized = [p for module in self.experts for p in module.params if module.quantized or self.experts_4bit]
        return {
            "modules": len(self.experts),
            "experts_per_module": max((module.num_experts for module in self.experts), default=0),
            "parameters": len(params),
            "weights": sum(p.numel for p in params),
            "quantized_4bit": len(quantized),
            "with_adapters": len(self.target_expert_params),
            "lora_params": sum(
                self.recipe.r * p.num_experts * (p.in_features + p.out_features)
                for p in params
                if p.name in set(self.expert_targets)
            ),
            "names": sorted({LAYER_INDEX.sub(".*", p.name) for p in params}),
        }

    # -- sizes -------------------------------------------------------------------

    @property
    def target_linears(self) -> list[Linear]:
        targets = set(self.targets)
        return [layer for layer in self.linears if layer.name in targets]

    @property
    def quantized_linears(self) -> list[Linear]:
        """The layers stored in 4 bits: every linear layer but the output head.

        A recipe with a quality option (``blocksize`` other than 64, LoftQ, ``unquantized_modules``)
        loads the base in 16 bits and quantizes its targets only, less its ``unquantized_modules``.
        """
        if quantizes_targets_itself(self.recipe):
            kept = self.recipe.unquantized_modules
            return [layer for layer in self.target_linears if not user_excluded(layer.name, kept)]
        return [layer for layer in self.linears if layer.name not in self.heads]

    @property
    def linears_16bit(self) -> list[Linear]:
        """Linear layers besides the output head that stay in 16 bits (only with a quality option)."""
        quantized = {layer.name for layer in self.quantized_linears}
        return [layer for layer in self.linears if layer.name not in self.heads and layer.name not in quantized]

    def lora_param_counts(self) -> list[int]:
        """Trainable parameters of each adapted layer (A, B, and DoRA's magnitude), then of each adapted
        expert parameter (one A and B per expert)."""
        r = self.recipe.r
        extra = 1 if self.recipe.use_dora else 0
        linear = [r * (t.in_features + t.out_features) + extra * t.out_features for t in self.target_linears]
        return linear + [r * p.num_experts * (p.in_features + p.out_features) for p in self.target_expert_params]

    def lora_tensor_sizes(self) -> list[int]:
        """Element counts of each trainable tensor (what the optimizer sees one by one)."""
        r = self.recipe.r
        sizes = []
        for t in self.target_linears:
            sizes += [r * t.in_features, r * t.out_features]
            if self.recipe.use_dora:
                sizes.append(t.out_features)
        for p in self.target_expert_params:  # PEFT stacks the experts' A and B: one tensor each
            sizes += [r * p.num_experts * p.in_features, r * p.num_experts * p.out_features]
        return sizes

    @property
    def trainable_params(self) -> int:
        return sum(self.lora_param_counts())

    @property
    def base_params(self) -> int:
        """Parameters of the base model (a tied head counted once)."""
        linear = sum(t.in_features * t.out_features for t in self.quantized_linears)
        return (
            linear + self.unquantized_params() + (sum(p.numel for p in self.expert_params) if self.experts_4bit else 0)
        )

    def quantized_bytes(self) -> int:
        """Bytes of the 4-bit weights (linear layers, and MoE experts) with their quantization constants."""
        blocksize = self.recipe.blocksize
        linear = sum(
            nf4_bytes(t.in_features * t.out_features, self.recipe.double_quant, blocksize)
            for t in self.quantized_linears
        )
        return linear + self.expert_bytes()

    def unquantized_params(self) -> int:
        """Parameters kept in 16/32 bits: embeddings, output head, norms, biases, and with a quality option
        the linear layers it keeps out of 4 bits (:attr:`linears_16bit`)."""
        head = (
            0 if self.tied_head else sum(t.in_features * t.out_features for t in self.linears if t.name in self.heads)
        )
        experts = 0 if self.experts_4bit else sum(p.numel for p in self.expert_params)
        linear = sum(t.in_features * t.out_features for t in self.linears_16bit)
        return sum(self.other_params.values()) + head + experts + linear

    def config_values(self) -> dict[str, Any]:
        """The model's config as plain keys (a transformers config, or the namespace read from config.json)."""
        to_dict = getattr(self.config, "to_dict", None)
        if callable(to_dict):
            return dict(to_dict())
        return dict(vars(self.config)) if self.config is not None else {}

    def warnings(self, seq: int | None = None, seq_field: str = "--seq") -> list[str]:
        """What the recipe (and a sequence length ``seq``) asks beyond this model's limits.

        The rank against each adapted layer's width, and ``seq`` against the model's positions
        (:mod:`qlora_plugin.core.model_limits`; a length a learned position table cannot take is an error).
        """
        found = rank_warnings(self.recipe.r, [(t.name, t.in_features, t.out_features) for t in self.target_linears])
        if seq is not None:
            seq_warning = check_sequence_length(seq, seq_field, self.config_values(), self.architecture)
            found += [seq_warning] if seq_warning else []
        return found

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.source,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "recipe": self.recipe.recipe_fields()
            | {"target_modules": "auto" if self.recipe.targets_are_auto else self.recipe.target_modules},
            "targets": self.targets,
            "target_groups": self.groups,
            "skipped": self.skipped,
            "trainable_params": self.trainable_params,
            "base_params": self.base_params,
            "quantized_linear_bytes": self.quantized_bytes(),
            "unquantized_params": self.unquantized_params(),
            "tied_output_head": self.tied_head,
            **({"experts": self.expert_summary() | {"target_parameters": self.expert_targets}} if self.experts else {}),
            "warnings": self.warnings(),
        }


def nf4_bytes(numel: int, double_quant: bool, blocksize: int = 64) -> int:
    """Bytes bitsandbytes holds for one 4-bit weight of ``numel`` elements.

    Two 4-bit values per byte; one absmax per block of ``blocksize``: a float32,
    or with double quant a uint8 code plus, per 256 blocks, a float32 second-level
    absmax, the 256-entry float32 code book of that second level and a float32
    offset. Each tensor also keeps the 16-entry float32 NF4 code book. Every
    tensor is rounded up to the CUDA allocator's 512-byte blocks.
    """
    blocks = math.ceil(numel / blocksize)
    tensors = [math.ceil(numel / 2), 16 * 4]
    tensors += [blocks, math.ceil(blocks / 256) * 4, 256 * 4, 4] if double_quant else [blocks * 4]
    return sum(_allocated(size) for size in tensors)


def experts_nf4_bytes(experts: int, numel: int, double_quant: bool, blocksize: int = 64) -> int:
    """Bytes of one fused expert parameter in the plugin's 4-bit storage (``qlora_plugin.build.moe_experts``).

    Each expert is quantized on its own (``numel`` weights each) and the experts' codes and
    constants are stacked: one tensor of codes, one of absmax (a uint8 each with double quant,
    plus per expert a float32 second-level absmax per 256 blocks and a float32 offset; else a
    float32 each), each rounded to the allocator's blocks; the two code books are shared.
    """
    blocks = math.ceil(numel / blocksize)
    tensors = [experts * math.ceil(numel / 2)]
    if double_quant:
        tensors += [experts * blocks, experts * math.ceil(blocks / 256) * 4, experts * 4]
    else:
        tensors += [experts * blocks * 4]
    return sum(_allocated(size) for size in tensors)


def _allocated(nbytes: int) -> int:
    return math.ceil(nbytes / ALLOCATION) * ALLOCATION


def skip_reason(name: str, heads: set[str], recipe: QLoRARecipe | RecipeSpec, user_excluded: bool) -> str:
    """Why the linear layer ``name`` gets no adapter, in words."""
    parts = name.split(".")
    if name in heads:
        return "output head (kept out of LoRA and of 4-bit quantization)"
    if parts[-1] in ROUTER_NAMES:
        return "mixture-of-experts router/gate (a tiny layer whose exact routing matters)"
    if any(part in VISION_PARTS for part in parts):
        return "vision tower / multimodal projector (only the language model is adapted)"
    if user_excluded:
        return "excluded by the recipe's exclude_modules"
    if not recipe.targets_are_auto:
        return "not named in the recipe's target_modules"
    return "left out by a plugin's target rule"


def adapted_names(linears: list[Linear], recipe: QLoRARecipe | RecipeSpec) -> list[str]:
    """The full names of the layers a resolved recipe adapts (its names may be last parts only)."""
    assert recipe.target_modules is not None  # the field checks never leave it None
    wanted = set(recipe.target_modules)
    return [
        layer.name
        for layer in linears
        if layer.name in wanted or any(layer.name.endswith("." + name) for name in wanted)
    ]


def build_report(
    *,
    source: str,
    architecture: str,
    config: Any,
    recipe: QLoRARecipe | RecipeSpec,
    user_recipe: QLoRARecipe | RecipeSpec,
    linears: list[Linear],
    targets: list[str],
    heads: set[str],
    other_params: dict[str, int],
    tied_head: bool,
    norm_count: int,
    extra_skipped: dict[str, str] | None = None,
    experts: list[ExpertsModule] | None = None,
    expert_targets: list[str] | None = None,
    experts_4bit: bool = True,
) -> ModelReport:
    """A :class:`ModelReport` with the skipped layers explained and the targets grouped."""
    target_set = set(targets)
    skipped = {
        layer.name: skip_reason(layer.name, heads, user_recipe, _user_excluded(layer.name, user_recipe))
        for layer in linears
        if layer.name not in target_set
    }
    skipped.update(extra_skipped or {})
    report = ModelReport(
        source=source,
        architecture=architecture,
        model_type=getattr(config, "model_type", "?"),
        config=config,
        recipe=recipe,
        linears=linears,
        targets=targets,
        skipped=skipped,
        heads=heads,
        other_params=other_params,
        tied_head=tied_head,
        experts=experts or [],
        expert_targets=list(expert_targets or []),
        experts_4bit=experts_4bit,
    )
    report.norm_count = norm_count
    report.groups = group_targets(report)
    report.layer_count = max((len(g["layers"]) for g in report.groups), default=0)
    return report


def _user_excluded(name: str, recipe: QLoRARecipe | RecipeSpec) -> bool:
    return user_excluded(name, getattr(recipe, "_user_exclude_modules", recipe.exclude_modules))


def group_targets(report: ModelReport) -> list[dict[str, Any]]:
    """The targets grouped by module type: ``model.layers.*.self_attn.q_proj`` over layers 0-31."""
    groups: dict[tuple[str, int, int], dict[str, Any]] = {}
    layers_of: dict[tuple[str, int, int], list[int]] = defaultdict(list)
    counts = dict(zip([t.name for t in report.target_linears], report.lora_param_counts(), strict=False))
    for t in report.target_linears:
        indices = LAYER_INDEX.findall(t.name)
        pattern = LAYER_INDEX.sub(".*", t.name)
        key = (pattern, t.in_features, t.out_features)
        group = groups.setdefault(
            key,
            {
                "module": pattern,
                "type": t.name.rsplit(".", 1)[-1],
                "in_features": t.in_features,
                "out_features": t.out_features,
                "count": 0,
                "lora_params_each": counts[t.name],
                "lora_params": 0,
            },
        )
        group["count"] += 1
        group["lora_params"] += counts[t.name]
        if indices:
            layers_of[key].append(int(indices[0]))
    for key, group in groups.items():
        group["layers"] = sorted(layers_of[key])
        group["layer_ranges"] = compress_ranges(group["layers"])
    return list(groups.values())


def compress_ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``; ``"-"`` for none."""
    if not numbers:
        return "-"
    runs: list[list[int]] = []
    for n in sorted(set(numbers)):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
