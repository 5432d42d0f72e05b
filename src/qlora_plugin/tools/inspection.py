"""``qlora inspect``: what a recipe does to a model, read from its config alone.

The model is built on the meta device (modules and shapes, no weights), the
recipe's targets are resolved on it with the same rule training uses, and every
linear layer that gets no adapter is listed with the reason. The base's size is
counted as bitsandbytes stores it: every linear layer but the output head in
4 bits (what transformers quantizes when it loads a model with the recipe's
``BitsAndBytesConfig``), everything else in the compute dtype.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from qlora_plugin.core.experts import find_experts, unwrapped_name
from qlora_plugin.core.fields import RecipeSpec
from qlora_plugin.core.patches import allowed
from qlora_plugin.core.targets import is_linear, output_head_names
from qlora_plugin.tools.config_layers import report_from_config
from qlora_plugin.tools.model_report import (
    LAYER_INDEX,
    Linear,
    ModelReport,
    adapted_names,
    build_report,
    compress_ranges,
)

if TYPE_CHECKING:
    from torch import nn

    from qlora_plugin.core.fields import RecipeSpec
    from qlora_plugin.core.recipe import QLoRARecipe


def analyze(model: str | os.PathLike[str] | nn.Module, recipe: QLoRARecipe | RecipeSpec) -> ModelReport:
    """Resolve ``recipe`` on ``model`` (a path or hub id, read as config only; or a module).

    A local config of a common decoder family is read without torch
    (:mod:`qlora_plugin.tools.config_layers`); anything else is built on the meta device.
    """
    if isinstance(model, (str, os.PathLike)):
        quick = report_from_config(model, recipe)
        if quick is not None:
            return quick
    return analyze_module(model, recipe)


def analyze_module(model: str | os.PathLike[str] | nn.Module, recipe: QLoRARecipe | RecipeSpec) -> ModelReport:
    """:func:`analyze` on the model itself (a path is built on the meta device, no weights)."""
    from qlora_plugin.build.models import as_model, auto_class, load_config

    if isinstance(recipe, RecipeSpec):
        from qlora_plugin.core.recipe import recipe_from_spec

        recipe = recipe_from_spec(recipe)
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    if isinstance(model, (str, os.PathLike)):
        auto_class(load_config(model))  # a clear error for configs that are no causal LM
    module: Any = as_model(model)  # a transformers model: its embedding accessors are read below
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

    experts = find_experts(module)
    expert_names = {param.name for experts_module in experts for param in experts_module.params}
    other = {
        name: p.numel()
        for name, p in module.named_parameters()
        if name not in linear_params and unwrapped_name(name) not in expert_names
    }
    head, embeddings = module.get_output_embeddings(), module.get_input_embeddings()
    tied = head is not None and embeddings is not None and head.weight is embeddings.weight
    targets = adapted_names(linears, resolved)
    experts_4bit = all(m.quantized for m in experts) or (
        allowed("transformers-fused-experts") and allowed("peft-param-wrapper-forward")
    )
    norms = sum(1 for layer in module.modules() if "norm" in type(layer).__name__.lower())
    return build_report(
        source=source,
        architecture=type(module).__name__,
        config=getattr(module, "config", None),
        recipe=resolved,
        user_recipe=recipe,
        linears=linears,
        targets=targets,
        heads=heads,
        other_params=other,
        tied_head=tied,
        norm_count=norms,
        experts=experts,
        expert_targets=sorted(resolved.target_parameters or []),
        experts_4bit=experts_4bit,
    )


def group_skipped(report: ModelReport) -> list[dict[str, Any]]:
    """Skipped layers grouped by name pattern and reason."""
    grouped: dict[tuple[str, str], dict[str, Any]] = {}
    for name, reason in report.skipped.items():
        pattern = LAYER_INDEX.sub(".*", name)
        entry = grouped.setdefault((pattern, reason), {"module": pattern, "reason": reason, "count": 0, "layers": []})
        entry["count"] += 1
        indices = LAYER_INDEX.findall(name)
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


# How each compute_dtype runs, as the recipe resolves it (qlora_plugin.core.device.resolve_compute_dtype).
COMPUTE_WORDS = {
    "auto": "bf16 (fp16 on GPUs without bf16)",
    "bfloat16": "bf16",
    "float16": "fp16",
    "float32": "float32",
}


def describe_recipe(recipe: QLoRARecipe | RecipeSpec) -> str:
    """One line: the recipe's LoRA and quantization settings, and the precision it computes in."""
    quant = f"{recipe.quant_type}{' + double quant' if recipe.double_quant else ''}"
    compute = COMPUTE_WORDS.get(str(recipe.compute_dtype), str(recipe.compute_dtype))
    if not recipe.fast_path:
        path = f"compute {compute}; stock path (PEFT upcasts norms and embeddings to fp32)"
    elif recipe.compute_dtype == "float32":
        path = f"compute {compute}; fast path"
    else:
        path = f"compute {compute}; fast path (no fp32 upcasts)"
    dora = ", DoRA" if recipe.use_dora else ""
    return (
        f"preset {recipe.preset}: r={recipe.r}, alpha={recipe.lora_alpha}, dropout={recipe.lora_dropout}{dora}; "
        f"base {quant}; {path}"
    )
