"""A model's own limits: the sizes in its ``config.json`` that make sense, and what a run may ask of them.

A ``config.json`` with zero heads, a hidden size its heads do not divide, a string
where a size belongs or a billion layers used to surface as ``ZeroDivisionError``,
``TypeError`` or a hang in the code that reads it. :func:`check_model_config` reads
every size a decoder states before anything computes with it, and names the key,
the value and the fix. :func:`check_sequence_length` compares a run's sequence
length with the positions the model has (refused where the model's positions are a
learned table, which fails on longer rows; a warning where they are rotary, which
only goes beyond the context the model was trained for), and :func:`rank_warnings`
compares the LoRA rank with the width of each adapted layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from qlora_plugin.core.errors import QLoRAConfigError

# Size keys (several families' spellings) and the largest value any real model comes near: a
# value beyond it is a typo, and building the model would take minutes or all the memory.
SIZE_LIMITS: dict[str, int] = {
    "hidden_size": 1 << 17,
    "n_embd": 1 << 17,
    "d_model": 1 << 17,
    "intermediate_size": 1 << 20,
    "n_inner": 1 << 20,
    "ffn_dim": 1 << 20,
    "moe_intermediate_size": 1 << 20,
    "num_hidden_layers": 1024,
    "n_layer": 1024,
    "num_attention_heads": 1 << 12,
    "n_head": 1 << 12,
    "num_key_value_heads": 1 << 12,
    "head_dim": 1 << 14,
    "vocab_size": 1 << 24,
    "max_position_embeddings": 1 << 40,
    "n_positions": 1 << 40,
}
# Keys read before transformers checks them, that are not sizes: what each must be, with an example.
OTHER_KEYS: dict[str, tuple[tuple[type, ...], str, str]] = {
    "model_type": ((str,), "the family's name as text", '"llama"'),
    "architectures": ((list,), "a list of class names", '["LlamaForCausalLM"]'),
    "tie_word_embeddings": ((bool,), "true or false", "false"),
    "attention_bias": ((bool,), "true or false", "false"),
    "mlp_bias": ((bool,), "true or false", "false"),
}
HIDDEN = ("hidden_size", "n_embd", "d_model")
HEADS = ("num_attention_heads", "n_head")
POSITIONS = ("max_position_embeddings", "n_positions")
# Families whose positions are a learned table (an embedding row per position): a longer row fails there.
LEARNED_POSITIONS = ("gpt2", "gpt_bigcode", "gpt_neo", "opt", "biogpt", "xglm", "bart", "blenderbot", "mbart")


def check_model_config(config: Mapping[str, Any], where: str) -> None:
    """Raise for the first size in ``config`` (a config.json as a mapping) that no model can have.

    ``where`` names the file in the error (``./model/config.json``). A ``text_config``
    (vision-language models) is checked the same way. Keys left out or ``null`` are the
    library's defaults and are not judged here.
    """
    if not isinstance(config, Mapping):
        raise QLoRAConfigError(
            "config.json",
            where,
            f"holds a JSON {type(config).__name__}, not an object of model settings",
            "restore the model's config.json",
        )
    _check_sizes(config, where)
    text = config.get("text_config")
    if isinstance(text, Mapping):
        _check_sizes(text, f"{where} text_config")


def _check_sizes(config: Mapping[str, Any], where: str) -> None:
    for key, (kinds, what, example) in OTHER_KEYS.items():
        value = config.get(key)
        bad_items = isinstance(value, list) and not all(isinstance(item, str) for item in value)
        if value is not None and (not isinstance(value, kinds) or bad_items):
            raise QLoRAConfigError(
                f"{where}: {key}",
                value,
                f"must be {what}, not {type(value).__name__}",
                f"restore {key} from the model's original config.json (e.g. {example})",
            )
    for key, limit in SIZE_LIMITS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise QLoRAConfigError(
                f"{where}: {key}",
                value,
                f"must be a whole number, not {type(value).__name__}",
                f"write {key} as a number without quotes, as the model's original config.json has it",
            )
        if value < 1:
            raise QLoRAConfigError(
                f"{where}: {key}", value, "must be at least 1", f"restore {key} from the model's original config.json"
            )
        if value > limit:
            raise QLoRAConfigError(
                f"{where}: {key}",
                value,
                f"is beyond any real model (at most {limit:,}): a typo?",
                f"restore {key} from the model's original config.json",
            )
    hidden = _first(config, HIDDEN)
    heads = _first(config, HEADS)
    kv_heads = config.get("num_key_value_heads")
    if hidden and heads and config.get("head_dim") is None and hidden % heads:
        raise QLoRAConfigError(
            f"{where}: {_name(config, HEADS)}",
            heads,
            f"does not divide the hidden size {hidden} (each head gets hidden size / heads features)",
            "restore the number of heads from the model's original config.json, or give head_dim",
        )
    if heads and kv_heads and heads % kv_heads:
        raise QLoRAConfigError(
            f"{where}: num_key_value_heads",
            kv_heads,
            f"does not divide the {heads} attention heads (each key/value head serves a whole group of them)",
            "restore num_key_value_heads from the model's original config.json",
        )


def positions_of(config: Mapping[str, Any]) -> int | None:
    """The number of positions the model has (``max_position_embeddings`` or ``n_positions``), or None."""
    text = config.get("text_config")
    found = _first(config, POSITIONS)
    if found is None and isinstance(text, Mapping):
        found = _first(text, POSITIONS)
    return found if isinstance(found, int) and not isinstance(found, bool) and found > 0 else None


def has_learned_positions(config: Mapping[str, Any]) -> bool:
    """True where each position is a row of a learned table (GPT-2's ``wpe``), which a longer row indexes past."""
    return config.get("model_type") in LEARNED_POSITIONS


def check_sequence_length(length: Any, field: str, config: Mapping[str, Any], model: str) -> str | None:
    """Compare a run's sequence length with the model's positions: raise where it cannot work, else a warning or None.

    ``field`` is how the user spelled it (``max_length``, ``sequence_len``, ``--seq``).
    """
    positions = positions_of(config)
    if positions is None or not isinstance(length, int) or isinstance(length, bool) or length <= positions:
        return None
    if has_learned_positions(config):
        raise QLoRAConfigError(
            field,
            length,
            f"is more than the {positions} positions {model} has (a learned table: a longer row fails inside the "
            "model with an index error)",
            f"set {field} to {positions} or less",
        )
    return (
        f"{field}={length} is more than the {positions} positions {model} was trained with; rows longer than that "
        "go beyond its context (quality may drop unless the model's rope scaling extends it)"
    )


def rank_warnings(r: int, layers: Iterable[tuple[str, int, int]]) -> list[str]:
    """One warning where the rank ``r`` is at least the width of adapted layers (``(name, in, out)``).

    Such an adapter is full rank: it has as many parameters as the layer itself, or more, and a
    smaller rank trains the same updates for less.
    """
    narrow = [(name, min(n_in, n_out)) for name, n_in, n_out in layers if r >= min(n_in, n_out)]
    if not narrow:
        return []
    name, width = min(narrow, key=lambda layer: layer[1])
    return [
        f"r={r} is at least the width of {len(narrow)} adapted layer(s) (the narrowest, {name}, has "
        f"{width}): LoRA there is full rank, with more parameters than the layer; r below {width} trains the "
        "same kind of update for less"
    ]


def _first(config: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    return next((config[key] for key in keys if config.get(key) is not None), None)


def _name(config: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    return next((key for key in keys if config.get(key) is not None), keys[0])
