"""Which modules get LoRA adapters: the built-in discovery rule.

The rule: every linear layer (``nn.Linear``, GPT-2's ``Conv1D``, and their
quantized forms) of the language model, except
- the output head (also when it is tied to the input embeddings),
- MoE routers and gates (``gate``, ``router``, ``shared_expert_gate``),
- vision towers and multimodal projectors of vision-language models.

The same rule is expressed twice: as :func:`qlora_target_modules` on a model, and
as :data:`AUTO_EXCLUDE_PATTERN` for PEFT's ``"all-linear"`` shorthand, which is
what a recipe that has not met its model yet hands to PEFT. Tests check that the
two agree on every architecture they build.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.hookspecs import RecipeFields, hookimpl

if TYPE_CHECKING:
    from torch import nn

HEAD_NAMES = ("lm_head", "embed_out")
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
VISION_PARTS = (
    "vision_tower",
    "vision_model",
    "visual",
    "vision_encoder",
    "image_encoder",
    "multi_modal_projector",
    "mm_projector",
    "vision_projection",
)
# Output heads are named too: PEFT's "all-linear" drops them already, but an
# exclusion pattern that excludes nothing on a model makes PEFT warn.
AUTO_EXCLUDE_PATTERN = (
    rf"(?:.*\.)?(?:{'|'.join(HEAD_NAMES + ROUTER_NAMES)})"
    rf"|(?:.*\.)?(?:{'|'.join(VISION_PARTS)})(?:\..*)?"
)
_AUTO_EXCLUDE = re.compile(AUTO_EXCLUDE_PATTERN)


def is_linear(module: nn.Module) -> bool:
    """True for the layer types LoRA adapts as linear maps (quantized ones too)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of every linear layer in ``model``, in module order.

    A layer PEFT already wrapped with LoRA counts under its own name (``...q_proj``), never its
    parts (``...q_proj.base_layer``, ``...q_proj.lora_A.default``): targets found on a PEFT model
    are those of its base.
    """
    names: list[str] = []
    inside = ""  # the LoRA wrapper whose parts named_modules (pre-order) is walking through
    for name, module in model.named_modules():
        if not name or (inside and name.startswith(inside + ".")):
            continue
        base = getattr(module, "base_layer", None)
        if base is not None and hasattr(module, "lora_A"):
            inside = name
            if is_linear(base) or is_linear(getattr(base, "base_layer", base)):
                names.append(name)
            continue
        if is_linear(module):
            names.append(name)
    return names


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the modules that hold the model's output embeddings."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return set()
    return {name for name, module in model.named_modules() if module is head}


@hookimpl(trylast=True)
def qlora_target_modules(model: nn.Module, recipe: RecipeFields) -> list[str]:
    """The generic rule: every linear layer but heads, routers and vision parts."""
    return rule_targets(linear_layer_names(model), output_head_names(model))


def rule_targets(linear_names: list[str], heads: set[str]) -> list[str]:
    """The generic rule on layer names: all of ``linear_names`` but ``heads``, routers and vision parts."""
    return [name for name in linear_names if name not in heads and not _AUTO_EXCLUDE.fullmatch(name)]


def without_user_exclusions(found: list[str], recipe: RecipeFields, model_name: str) -> list[str]:
    """``found`` less the recipe's ``exclude_modules``; an error if nothing is left."""
    exclude = getattr(recipe, "_user_exclude_modules", recipe.exclude_modules)
    targets = [name for name in found if not user_excluded(name, recipe.exclude_modules)]
    if found and not targets:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in found})
        raise QLoRAConfigError(
            "exclude_modules",
            exclude,
            f"leaves no layer to adapt: it excludes all {len(found)} linear layers the rule found in {model_name} "
            f"({leaves})",
            f"exclude fewer modules, e.g. keep {leaves[:2]} out of exclude_modules",
        )
    if not targets:
        raise QLoRAConfigError(
            "target_modules",
            "auto",
            f"found no linear layer to adapt in {model_name}",
            "name the modules yourself, e.g. target_modules=['q_proj', 'v_proj']",
        )
    return targets


def check_targets_exist(model: nn.Module, target_modules: str | list[str] | set[str]) -> list[str]:
    """The linear layers of ``model`` that explicit targets name; raise if a name (or the pattern) matches none."""
    return named_targets(linear_layer_names(model), target_modules, type(model).__name__)


def named_targets(linear: list[str], target_modules: str | list[str] | set[str], model_name: str) -> list[str]:
    """The layers of ``linear`` that ``target_modules`` name, as PEFT matches them.

    A list names modules by their last parts (``q_proj`` matches
    ``model.layers.0.self_attn.q_proj``); a string is a regular expression
    matched against the whole name. Every name, or the pattern, must match.
    """
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
    if isinstance(target_modules, str):
        matched = [name for name in linear if re.fullmatch(target_modules, name)]
        if not matched:
            raise QLoRAConfigError(
                "target_modules",
                target_modules,
                f"as a regular expression matches no linear layer of {model_name} (it must match the whole "
                "name, e.g. model.layers.0.self_attn.q_proj)",
                f"use a list of the names it has, e.g. {leaves[:2]} (all: {leaves}), a pattern such as "
                "'.*\\.(q_proj|v_proj)', or 'auto'",
            )
        return matched
    missing = sorted(target for target in target_modules if not any(_names(name, target) for name in linear))
    if missing:
        raise QLoRAConfigError(
            "target_modules",
            missing,
            f"matches no linear layer of {model_name}",
            f"use names from the linear layers it has: {leaves}, or target_modules='auto'",
        )
    return [name for name in linear if any(_names(name, target) for target in target_modules)]


def _names(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def user_excluded(name: str, exclude: str | list[str] | set[str] | None) -> bool:
    """True if the recipe's ``exclude_modules`` (names, or a pattern) leave ``name`` out."""
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return any(_names(name, item) for item in exclude)
