"""``qlora inspect``: what a recipe does to a model, read from its config alone.

The model is built on the meta device (modules and shapes, no weights), the
recipe's targets are resolved on it with the same rule training uses, and every
linear layer that gets no adapter is listed with the reason. The base's size is
counted as bitsandbytes stores it: every linear layer but the output head in
4 bits (what transformers quantizes when it loads a model with the recipe's
``BitsAndBytesConfig``), everything else in the compute dtype.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from qlora_plugin.fields import RecipeSpec
    from qlora_plugin.recipe import QLoRARecipe

ALLOCATION = 512  # PyTorch's CUDA caching allocator rounds every block up to this
_LAYER_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


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

    # -- sizes -------------------------------------------------------------------

    @property
    def target_linears(self) -> list[Linear]:
        targets = set(self.targets)
        return [layer for layer in self.linears if layer.name in targets]

    @property
    def quantized_linears(self) -> list[Linear]:
        """The layers stored in 4 bits: every linear layer but the output head."""
        return [layer for layer in self.linears if layer.name not in self.heads]

    def lora_param_counts(self) -> list[int]:
        """Trainable parameters of each adapted layer (A, B, and DoRA's magnitude)."""
        r = self.recipe.r
        extra = 1 if self.recipe.use_dora else 0
        return [r * (t.in_features + t.out_features) + extra * t.out_features for t in self.target_linears]

    def lora_tensor_sizes(self) -> list[int]:
        """Element counts of each trainable tensor (what the optimizer sees one by one)."""
        r = self.recipe.r
        sizes = []
        for t in self.target_linears:
            sizes += [r * t.in_features, r * t.out_features]
            if self.recipe.use_dora:
                sizes.append(t.out_features)
        return sizes

    @property
    def trainable_params(self) -> int:
        return sum(self.lora_param_counts())

    @property
    def base_params(self) -> int:
        """Parameters of the base model (a tied head counted once)."""
        return sum(t.in_features * t.out_features for t in self.quantized_linears) + self.unquantized_params()

    def quantized_bytes(self) -> int:
        """Bytes of the 4-bit linear weights with their quantization constants."""
        return sum(nf4_bytes(t.in_features * t.out_features, self.recipe.double_quant)
                   for t in self.quantized_linears)

    def unquantized_params(self) -> int:
        """Parameters kept in 16/32 bits: embeddings, output head, norms, biases."""
        head = 0 if self.tied_head else sum(t.in_features * t.out_features for t in self.linears
                                            if t.name in self.heads)
        return sum(self.other_params.values()) + head

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.source,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "recipe": self.recipe.recipe_fields() | {"target_modules": "auto" if self.recipe.targets_are_auto
                                                      else self.recipe.target_modules},
            "targets": self.targets,
            "target_groups": self.groups,
            "skipped": self.skipped,
            "trainable_params": self.trainable_params,
            "base_params": self.base_params,
            "quantized_linear_bytes": self.quantized_bytes(),
            "unquantized_params": self.unquantized_params(),
            "tied_output_head": self.tied_head,
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


def _allocated(nbytes: int) -> int:
    return math.ceil(nbytes / ALLOCATION) * ALLOCATION


def skip_reason(name: str, heads: set[str], recipe: QLoRARecipe | RecipeSpec, user_excluded: bool) -> str:
    """Why the linear layer ``name`` gets no adapter, in words."""
    from qlora_plugin.targets import ROUTER_NAMES, VISION_PARTS

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


def analyze(model: str | os.PathLike[str] | nn.Module, recipe: QLoRARecipe | RecipeSpec) -> ModelReport:
    """Resolve ``recipe`` on ``model`` (a path or hub id, read as config only; or a module).

    A local config of a common decoder family is read without torch
    (:mod:`qlora_plugin.config_layers`); anything else is built on the meta device.
    """
    if isinstance(model, (str, os.PathLike)):
        from qlora_plugin.config_layers import report_from_config

        quick = report_from_config(model, recipe)
        if quick is not None:
            return quick
    return analyze_module(model, recipe)


def analyze_module(model: str | os.PathLike[str] | nn.Module, recipe: QLoRARecipe | RecipeSpec) -> ModelReport:
    """:func:`analyze` on the model itself (a path is built on the meta device, no weights)."""
    from qlora_plugin.fields import RecipeSpec
    from qlora_plugin.models import as_model, auto_class, load_config
    from qlora_plugin.targets import is_linear, output_head_names

    if isinstance(recipe, RecipeSpec):
        recipe = recipe.to_recipe()
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    if isinstance(model, (str, os.PathLike)):
        auto_class(load_config(model))  # a clear error for configs that are no causal LM
    module = as_model(model)
    resolved = recipe.resolve(module)
    heads = output_head_names(module)
    linears = []
    linear_params: set[str] = set()
    for name, layer in module.named_modules():
        if name and is_linear(layer):
            weight = layer.weight
            if type(layer).__name__ == "Conv1D":  # GPT-2 stores (in, out)
                in_features, out_features = weight.shape
            else:
                in_features, out_features = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
                if in_features is None:
                    out_features, in_features = weight.shape
            linears.append(Linear(name, int(in_features), int(out_features), getattr(layer, "bias", None) is not None))
            linear_params.add(f"{name}.weight")
    other = {name: p.numel() for name, p in module.named_parameters() if name not in linear_params}
    head, embeddings = module.get_output_embeddings(), module.get_input_embeddings()
    tied = head is not None and embeddings is not None and head.weight is embeddings.weight
    targets = adapted_names(linears, resolved)
    fused = {}
    from qlora_plugin.targets import VISION_PARTS

    for name, param in module.named_parameters():
        if param.dim() >= 3 and not any(part in VISION_PARTS for part in name.split(".")):
            fused[name] = "fused expert weights (a 3-D parameter, not a linear layer: LoRA adapts linear layers)"
    norms = sum(1 for layer in module.modules() if "norm" in type(layer).__name__.lower())
    return build_report(source=source, architecture=type(module).__name__, config=getattr(module, "config", None),
                        recipe=resolved, user_recipe=recipe, linears=linears, targets=targets, heads=heads,
                        other_params=other, tied_head=tied, norm_count=norms, extra_skipped=fused)


def adapted_names(linears: list[Linear], recipe: QLoRARecipe | RecipeSpec) -> list[str]:
    """The full names of the layers a resolved recipe adapts (its names may be last parts only)."""
    wanted = set(recipe.target_modules)
    return [layer.name for layer in linears
            if layer.name in wanted or any(layer.name.endswith("." + name) for name in wanted)]


def build_report(*, source: str, architecture: str, config: Any, recipe: QLoRARecipe | RecipeSpec,
                 user_recipe: QLoRARecipe | RecipeSpec, linears: list[Linear], targets: list[str], heads: set[str],
                 other_params: dict[str, int], tied_head: bool, norm_count: int,
                 extra_skipped: dict[str, str] | None = None) -> ModelReport:
    """A :class:`ModelReport` with the skipped layers explained and the targets grouped."""
    target_set = set(targets)
    skipped = {
        layer.name: skip_reason(layer.name, heads, user_recipe, _user_excluded(layer.name, user_recipe))
        for layer in linears if layer.name not in target_set
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
    )
    report.norm_count = norm_count
    report.groups = group_targets(report)
    report.layer_count = max((len(g["layers"]) for g in report.groups), default=0)
    return report


def _user_excluded(name: str, recipe: QLoRARecipe | RecipeSpec) -> bool:
    from qlora_plugin.targets import user_excluded

    return user_excluded(name, getattr(recipe, "_user_exclude_modules", recipe.exclude_modules))


def group_targets(report: ModelReport) -> list[dict[str, Any]]:
    """The targets grouped by module type: ``model.layers.*.self_attn.q_proj`` over layers 0-31."""
    groups: dict[tuple[str, int, int], dict[str, Any]] = {}
    layers_of: dict[tuple[str, int, int], list[int]] = defaultdict(list)
    counts = dict(zip([t.name for t in report.target_linears], report.lora_param_counts()))
    for t in report.target_linears:
        indices = _LAYER_INDEX.findall(t.name)
        pattern = _LAYER_INDEX.sub(".*", t.name)
        key = (pattern, t.in_features, t.out_features)
        group = groups.setdefault(key, {"module": pattern, "type": t.name.rsplit(".", 1)[-1],
                                        "in_features": t.in_features, "out_features": t.out_features,
                                        "count": 0, "lora_params_each": counts[t.name], "lora_params": 0})
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


def group_skipped(report: ModelReport) -> list[dict[str, Any]]:
    """Skipped layers grouped by name pattern and reason."""
    grouped: dict[tuple[str, str], dict[str, Any]] = {}
    for name, reason in report.skipped.items():
        pattern = _LAYER_INDEX.sub(".*", name)
        entry = grouped.setdefault((pattern, reason), {"module": pattern, "reason": reason, "count": 0, "layers": []})
        entry["count"] += 1
        indices = _LAYER_INDEX.findall(name)
        if indices:
            entry["layers"].append(int(indices[0]))
    for entry in grouped.values():
        entry["layer_ranges"] = compress_ranges(entry.pop("layers"))
    return list(grouped.values())


def base_sizes(report: ModelReport) -> dict[str, int]:
    """Bytes of the base: 4-bit linear weights, unquantized rest (compute dtype), total, and bf16 for scale."""
    compute = 4 if report.recipe.compute_dtype == "float32" else 2
    unquantized = report.unquantized_params() * compute
    return {
        "linear_4bit": report.quantized_bytes(),
        "unquantized": unquantized,
        "total": report.quantized_bytes() + unquantized,
        "all_16bit": report.base_params * 2,
    }


def describe_recipe(recipe: QLoRARecipe | RecipeSpec) -> str:
    """One line: the recipe's LoRA and quantization settings."""
    quant = f"{recipe.quant_type}{' + double quant' if recipe.double_quant else ''}"
    path = "fast path (bf16 throughout)" if recipe.fast_path else "stock path (PEFT's fp32 upcasts)"
    dora = ", DoRA" if recipe.use_dora else ""
    return (f"preset {recipe.preset}: r={recipe.r}, alpha={recipe.lora_alpha}, dropout={recipe.lora_dropout}{dora}; "
            f"base {quant}; {path}")


def command(args: Any) -> int:
    """``qlora inspect``."""
    from qlora_plugin.command_options import recipe_from_args
    from qlora_plugin.console import console, count, gib, print_json, table

    report = analyze(args.model, recipe_from_args(args))
    sizes = base_sizes(report)
    skipped = group_skipped(report)
    if args.json:
        print_json(report.to_dict() | {"base_bytes": sizes, "skipped_groups": skipped})
        return 0
    out = console()
    dims = report.config.get_text_config() if hasattr(report.config, "get_text_config") else report.config
    out.print(f"[bold]{report.source}[/bold]  {report.architecture} ({report.model_type}), "
              f"{getattr(dims, 'num_hidden_layers', '?')} layers, hidden {getattr(dims, 'hidden_size', '?')}, "
              f"vocabulary {getattr(dims, 'vocab_size', '?')}")
    out.print(f"recipe  {describe_recipe(report.recipe)}")
    out.print()
    rows = [[g["module"], g["layer_ranges"], g["count"], f"{g['in_features']} -> {g['out_features']}",
             f"{g['lora_params_each']:,}", f"{g['lora_params']:,}"] for g in report.groups]
    out.print(table(f"Adapted modules ({len(report.targets)})",
                    ["module", "layers", "count", "in -> out", "LoRA params each", "LoRA params"], rows, {2, 4, 5}))
    share = 100 * report.trainable_params / max(report.base_params, 1)
    out.print(f"\ntrainable LoRA parameters: [bold]{report.trainable_params:,}[/bold] "
              f"({count(report.trainable_params)}, {share:.2f}% of the {count(report.base_params)} base)")
    out.print(f"base in 4 bits: [bold]{gib(sizes['total'])} GiB[/bold] = {gib(sizes['linear_4bit'])} GiB 4-bit linear "
              f"weights with their constants + {gib(sizes['unquantized'])} GiB kept in the compute dtype "
              f"(embeddings, {'tied ' if report.tied_head else ''}output head, norms); "
              f"{gib(sizes['all_16bit'])} GiB in bf16")
    out.print()
    if skipped:
        rows = [[s["module"], s["layer_ranges"], s["count"], s["reason"]] for s in skipped]
        out.print(table("Linear layers without adapters", ["module", "layers", "count", "why"], rows, {2}))
    else:
        out.print("every linear layer gets an adapter")
    return 0
