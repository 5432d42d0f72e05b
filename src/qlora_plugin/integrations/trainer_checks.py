"""Checks on the trainer arguments a caller passes through ``recipe.sft_config(**overrides)``.

TRL's ``SFTConfig`` takes most values as given: a string learning rate fails deep
inside the optimizer, ``max_grad_norm=-1`` quietly turns clipping off, an argument
an older transformers had is a bare ``TypeError``, and ``load_in_8bit`` in
``model_init_kwargs`` fails inside the model's ``__init__``. These checks run first
and raise :class:`QLoRAConfigError` with the argument, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from typing import Any

from qlora_plugin.core.errors import QLoRAConfigError, nearest
from qlora_plugin.core.fields import NUMBERS, NumberRule, number
from qlora_plugin.core.files import require

# Arguments older transformers / TRL versions had, and what replaces each one now.
RENAMED = {
    "warmup_ratio": (
        "warmup_steps",
        (
            "transformers 5 folded it into warmup_steps: pass warmup_steps={value} "
            "(below 1 it is a fraction of the steps), or set the recipe's warmup_ratio"
        ),
    ),
    "evaluation_strategy": ("eval_strategy", "pass eval_strategy={value!r}"),
    "max_seq_length": ("max_length", "pass max_length={value!r}"),
    "no_cuda": ("use_cpu", "pass use_cpu={value!r}"),
}
# Trainer arguments with the recipe's own meaning: the recipe's range rules apply to them.
RECIPE_RULES = {
    "learning_rate": NUMBERS["learning_rate"],
    "max_grad_norm": NUMBERS["max_grad_norm"],
    "num_train_epochs": NumberRule("a positive number such as 3", low=0, open_low=True),
    "per_device_train_batch_size": NumberRule("a positive integer such as 8", integer=True, low=0, open_low=True),
    "gradient_accumulation_steps": NumberRule("a positive integer such as 2", integer=True, low=0, open_low=True),
}
# Arguments whose annotation is narrower than what the config takes: transformers 5 annotates
# `fsdp` as `str | None` but asks for `fsdp=True` (a string is deprecated there).
WIDER_THAN_ANNOTATED: dict[str, tuple[type, ...]] = {"fsdp": (bool, list)}
# Settings transformers takes as a dict or as the text of a JSON object; any other text fails only in training.
JSON_DICT_FIELDS = ("accelerator_config", "fsdp_config", "gradient_checkpointing_kwargs", "lr_scheduler_kwargs")
# Loading arguments that fight the recipe's 4-bit base.
NOT_WITH_A_4BIT_BASE = ("load_in_8bit", "load_in_4bit")


def check_sft_overrides(overrides: dict[str, Any], config_class: type | None = None) -> None:
    """Raise for the first override ``config_class`` (TRL's ``SFTConfig``) would take wrongly or not at all."""
    if config_class is None:
        from trl import SFTConfig

        config_class = SFTConfig
    known, hints = _arguments(config_class)
    for key, value in overrides.items():
        if key not in known:
            raise _unknown(key, value, known, config_class)
        _check_type(key, value, hints.get(key), config_class)
        if key in RECIPE_RULES and value is not None:
            number(key, value, RECIPE_RULES[key])
        if key == "warmup_steps":
            _check_warmup(value)
        if key == "model_init_kwargs" and value is not None:
            check_model_init_kwargs(value)
        if key in JSON_DICT_FIELDS and value is not None:
            _check_settings_mapping(key, value)
        if key == "deepspeed" and isinstance(value, str) and not value.lstrip().startswith("{"):
            require(value, "file", "deepspeed", "pass the path of a DeepSpeed JSON config, or a dict")


def check_model_init_kwargs(kwargs: Any) -> None:
    """``model_init_kwargs`` must be a mapping without 8-bit (or a second 4-bit) loading switch."""
    if not isinstance(kwargs, dict):
        raise QLoRAConfigError(
            "model_init_kwargs",
            kwargs,
            f"must be a dict, not {type(kwargs).__name__}",
            "pass e.g. model_init_kwargs={'attn_implementation': 'sdpa'}",
        )
    for key in NOT_WITH_A_4BIT_BASE:
        if key in kwargs:
            raise QLoRAConfigError(
                f"model_init_kwargs[{key!r}]",
                kwargs[key],
                "is not a model argument in transformers 5, and the recipe already loads the base in 4 bits",
                f"remove {key!r}; for another quantization change the recipe (quant_type, double_quant)",
            )
    quantization = kwargs.get("quantization_config")
    if getattr(quantization, "load_in_8bit", False):
        raise QLoRAConfigError(
            "model_init_kwargs['quantization_config']",
            "load_in_8bit=True",
            "is an 8-bit config; QLoRA trains over a 4-bit base",
            "remove it and let the recipe's 4-bit config load the model",
        )


def _check_settings_mapping(key: str, value: Any) -> None:
    """A dict-valued setting: a dict, or text holding a JSON object; checkpointing's keys are torch's."""
    import json

    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise QLoRAConfigError(
                key,
                value,
                "is text that is no JSON object (transformers reads this setting as a dict)",
                f"pass a dict such as {key}={EXAMPLES.get(key, '{}')}, or its JSON text",
            )
        value = parsed
    if key == "gradient_checkpointing_kwargs" and isinstance(value, dict):
        allowed = _checkpoint_arguments()
        unknown = sorted(str(name) for name in value if name not in allowed)
        if unknown:
            raise QLoRAConfigError(
                key,
                value,
                f"names {unknown}, which torch.utils.checkpoint.checkpoint does not take"
                + nearest(unknown[0], allowed),
                f"use its arguments {sorted(allowed)}, e.g. {EXAMPLES[key]}",
            )


EXAMPLES = {"gradient_checkpointing_kwargs": '{"use_reentrant": False}', "lr_scheduler_kwargs": '{"min_lr": 1e-6}'}


@functools.cache
def _checkpoint_arguments() -> frozenset[str]:
    import inspect

    from torch.utils.checkpoint import checkpoint

    parameters = inspect.signature(checkpoint).parameters.values()
    return frozenset(p.name for p in parameters if p.kind is p.KEYWORD_ONLY or p.name == "use_reentrant")


@functools.cache
def _arguments(config_class: type) -> tuple[frozenset[str], dict[str, Any]]:
    names = frozenset(field.name for field in dataclasses.fields(config_class) if field.init)
    return names, typing.get_type_hints(config_class)


def _unknown(key: str, value: Any, known: frozenset[str], config_class: type) -> QLoRAConfigError:
    where = f"{config_class.__module__.split('.')[0]} {_version(config_class)}'s {config_class.__name__}"
    if key in RENAMED and RENAMED[key][0] in known:
        return QLoRAConfigError(key, value, f"is not an argument of {where}", RENAMED[key][1].format(value=value))
    return QLoRAConfigError(
        key,
        value,
        f"is not an argument of {where}" + nearest(key, known),
        f"remove it, or use an argument {config_class.__name__} has (help({config_class.__name__}))",
    )


def _version(config_class: type) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(config_class.__module__.split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


def _check_type(key: str, value: Any, hint: Any, config_class: type) -> None:
    if isinstance(value, WIDER_THAN_ANNOTATED.get(key, ())):
        return
    if hint is None or _accepts(hint, value) is not False:
        if isinstance(value, float) and not math.isfinite(value):
            raise QLoRAConfigError(key, value, "must be a finite number", f"pass a finite {key}, or leave it out")
        return
    problem = f"must be {_describe(hint)}, not {type(value).__name__}"
    if key in RECIPE_RULES:
        raise QLoRAConfigError(key, value, problem, f"pass {key} as {RECIPE_RULES[key].fix}")
    default = next((f.default for f in dataclasses.fields(config_class) if f.name == key), None)
    example = f" such as {key}={default!r} ({config_class.__name__}'s default)" if _accepts(hint, default) else ""
    raise QLoRAConfigError(key, value, problem, f"pass {_describe(hint)}{example}")


def _accepts(hint: Any, value: Any) -> bool | None:
    """Whether ``value`` fits the annotation ``hint``; None where the annotation is too rich to tell."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        answers = [_accepts(member, value) for member in typing.get_args(hint)]
        return True if True in answers else (None if None in answers else False)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if hint is list or origin is list:
        return isinstance(value, (list, tuple))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint)
    return None


def _describe(hint: Any) -> str:
    names = {
        bool: "True or False",
        int: "an integer",
        float: "a number",
        str: "a string",
        dict: "a dict",
        list: "a list",
        type(None): "None",
    }
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    words = [
        names.get(typing.get_origin(member) or member, getattr(member, "__name__", str(member))) for member in members
    ]
    return " or ".join(dict.fromkeys(words))


def _check_warmup(value: Any) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise QLoRAConfigError(
            "warmup_steps", value, "is negative", "pass a step count such as 100, or a fraction below 1 such as 0.03"
        )
