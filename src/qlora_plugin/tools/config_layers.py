"""A model's linear layers read from its ``config.json`` alone, for the common decoder families.

``qlora inspect`` and ``qlora estimate`` need the names and shapes of a model's
layers. Building the model on the meta device gives them for any architecture,
but importing torch and transformers' model code takes several seconds; for the
Llama-style families below the layout is a few lines of arithmetic on the
config. Only configs that state every size the layout needs are read this way;
anything else (another family, a key left to its default, a hub id, a plugin
with its own target rule) returns ``None`` and goes through the meta model.
Tests check both ways give the same report for every family listed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from qlora_plugin.core.model_limits import check_model_config
from qlora_plugin.core.plugins import only_builtin_targets
from qlora_plugin.core.targets import named_targets, rule_targets, without_user_exclusions
from qlora_plugin.tools.model_report import Linear, build_report

if TYPE_CHECKING:
    from qlora_plugin.core.fields import RecipeSpec
    from qlora_plugin.core.recipe import QLoRARecipe
    from qlora_plugin.tools.model_report import ModelReport


@dataclass(frozen=True)
class Family:
    """How one decoder family lays out its layers."""

    architecture: str
    qkv_bias: str | bool  # a config key, or a fixed answer
    o_bias: str | bool
    mlp_bias: str | bool
    head_dim_required: bool = False  # no fallback to hidden_size // heads in the model code
    qk_norm: bool = False  # a norm over the head dimension for queries and keys


FAMILIES = {
    "llama": Family("LlamaForCausalLM", "attention_bias", "attention_bias", "mlp_bias"),
    "mistral": Family("MistralForCausalLM", False, False, False),
    "qwen2": Family("Qwen2ForCausalLM", True, False, False),
    "qwen3": Family(
        "Qwen3ForCausalLM", "attention_bias", "attention_bias", False, head_dim_required=True, qk_norm=True
    ),
}
REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def report_from_config(path: str | os.PathLike[str], recipe: QLoRARecipe | RecipeSpec) -> ModelReport | None:
    """The :class:`ModelReport` of the model at ``path`` read from its config, or ``None`` where it cannot be."""
    config = _read_config(Path(path))
    if config is None or _plugins_choose_targets():
        return None

    check_model_config(config, os.fspath(Path(path) / "config.json"))
    family = FAMILIES.get(config.get("model_type", ""))
    if family is None or any(config.get(key) is None for key in REQUIRED):
        return None
    flags = {name: _flag(config, getattr(family, name)) for name in ("qkv_bias", "o_bias", "mlp_bias")}
    if None in flags.values() or (family.head_dim_required and config.get("head_dim") is None):
        return None
    return _report(os.fspath(path), config, family, flags, recipe)


def _read_config(path: Path) -> dict[str, Any] | None:
    file = path / "config.json"
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the meta path reports it the usual way
    return config if isinstance(config, dict) else None


def _flag(config: dict[str, Any], rule: str | bool) -> Any:
    """``rule`` itself, or the config.json value it names (a bool; None where the config lacks it)."""
    return rule if isinstance(rule, bool) else config.get(rule)


def _plugins_choose_targets() -> bool:
    """True if an installed plugin has its own target rule (it needs the model itself)."""
    return not only_builtin_targets()


def _report(
    source: str, config: dict[str, Any], family: Family, flags: dict[str, bool], recipe: QLoRARecipe | RecipeSpec
) -> ModelReport:
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    shapes = {
        "self_attn.q_proj": (hidden, heads * head_dim, flags["qkv_bias"]),
        "self_attn.k_proj": (hidden, kv_heads * head_dim, flags["qkv_bias"]),
        "self_attn.v_proj": (hidden, kv_heads * head_dim, flags["qkv_bias"]),
        "self_attn.o_proj": (heads * head_dim, hidden, flags["o_bias"]),
        "mlp.gate_proj": (hidden, inter, flags["mlp_bias"]),
        "mlp.up_proj": (hidden, inter, flags["mlp_bias"]),
        "mlp.down_proj": (inter, hidden, flags["mlp_bias"]),
    }
    linears: list[Linear] = []
    other: dict[str, int] = {"model.embed_tokens.weight": vocab * hidden}
    for index in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{index}"
        for part, (n_in, n_out, bias) in shapes.items():
            linears.append(Linear(f"{prefix}.{part}", n_in, n_out, bias))
            if bias:
                other[f"{prefix}.{part}.bias"] = n_out
        if family.qk_norm:
            other[f"{prefix}.self_attn.q_norm.weight"] = head_dim
            other[f"{prefix}.self_attn.k_norm.weight"] = head_dim
        other[f"{prefix}.input_layernorm.weight"] = hidden
        other[f"{prefix}.post_attention_layernorm.weight"] = hidden
    other["model.norm.weight"] = hidden
    linears.append(Linear("lm_head", hidden, vocab, False))
    names = [layer.name for layer in linears]
    heads_found = {"lm_head"}
    if recipe.targets_are_auto:
        targets = without_user_exclusions(rule_targets(names, heads_found), recipe, family.architecture)
    else:
        assert recipe.target_modules is not None  # the field checks never leave it None
        targets = named_targets(names, recipe.target_modules, family.architecture)
    resolved = recipe.replace(target_modules=targets)
    norms = config["num_hidden_layers"] * (4 if family.qk_norm else 2) + 1
    view = SimpleNamespace(**{**config, "head_dim": head_dim})
    return build_report(
        source=source,
        architecture=family.architecture,
        config=view,
        recipe=resolved,
        user_recipe=recipe,
        linears=linears,
        targets=targets,
        heads=heads_found,
        other_params=other,
        tied_head=bool(config["tie_word_embeddings"]),
        norm_count=norms,
    )
