"""Which modules get LoRA adapters: the built-in discovery rule.

The rule: every linear layer (``nn.Linear``, GPT-2's ``Conv1D``, and their
quantized forms) of the language model, except
- the output head (also when it is tied to the input embeddings),
- MoE routers and gates (``gate``, ``router``, ``shared_expert_gate``),
- vision towers and multimodal projectors of vision-language models.

The same rule is expressed twice: as :func:`discover_targets` on a model, and
as :data:`AUTO_EXCLUDE_PATTERN` for PEFT's ``"all-linear"`` shorthand, which is
what a recipe that has not met its model yet hands to PEFT. Tests check that the
two agree on every architecture they build.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from qlora_plugin.errors import QLoRAConfigError
from qlora_plugin.hookspecs import hookimpl

if TYPE_CHECKING:
    from torch import nn

    from qlora_plugin.recipe import QLoRARecipe

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
    """Names of every linear layer in ``model``, in module order."""
    return [name for name, module in model.named_modules() if name and is_linear(module)]


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the modules that hold the model's output embeddings."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return set()
    return {name for name, module in model.named_modules() if module is head}


@hookimpl(trylast=True)
def qlora_target_modules(model: nn.Module, recipe: QLoRARecipe) -> list[str]:
    """The generic rule: every linear layer but heads, routers and vision parts."""
    heads = output_head_names(model)
    return [
        name
        for name in linear_layer_names(model)
        if name not in heads and not _AUTO_EXCLUDE.fullmatch(name)
    ]


def discover_targets(model: nn.Module, recipe: QLoRARecipe) -> list[str]:
    """Ask the plugins (then the generic rule) for the targets of ``model``.

    The recipe's ``exclude_modules`` are removed from the answer.
    """
    from qlora_plugin.plugins import plugin_manager

    found = plugin_manager().hook.qlora_target_modules(model=model, recipe=recipe)
    targets = [name for name in found if not _excluded_by_user(name, recipe.exclude_modules)]
    if not targets:
        raise QLoRAConfigError(
            "target_modules",
            "auto",
            f"found no linear layer to adapt in {type(model).__name__}",
            "name the modules yourself, e.g. target_modules=['q_proj', 'v_proj']",
        )
    return targets


def check_targets_exist(model: nn.Module, target_modules: list[str] | set[str]) -> None:
    """Raise if some named target matches no linear layer of ``model``."""
    linear = linear_layer_names(model)
    missing = sorted(
        target
        for target in target_modules
        if not any(name == target or name.endswith("." + target) for name in linear)
    )
    if missing:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise QLoRAConfigError(
            "target_modules",
            missing,
            f"matches no linear layer of {type(model).__name__}",
            f"use names from the linear layers it has: {leaves}, or target_modules='auto'",
        )


def _excluded_by_user(name: str, exclude: str | list[str] | set[str] | None) -> bool:
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return any(name == item or name.endswith("." + item) for item in exclude)
