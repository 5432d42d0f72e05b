"""The recipe's fields as plain data: names, defaults and the checks every entry point shares.

Light on purpose (no torch, PEFT or transformers), so the quick ``qlora`` subcommands,
``qlora check`` and the Axolotl section validate exactly as :class:`QLoRARecipe` does:
it calls :func:`check_fields` too.

Input rules, the same on every path (Python, YAML, ``--set``):

- numbers must be finite; a numeric string (PyYAML reads ``2e-4`` as text) counts as
  the number it spells, as in Axolotl's own keys; a whole float (``16.0``) counts as
  an integer where one is wanted;
- ``target_modules`` / ``exclude_modules`` as a string: a bare module name
  (``q_proj``) means that one name, as in a list; any other string is a regular
  expression matched against each layer's full name, as PEFT treats a string.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from numbers import Real
from typing import Any, SupportsInt, cast

from qlora_plugin.core.errors import QLoRAConfigError, nearest
from qlora_plugin.core.plugins import preset_fields

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
STORAGE_DTYPES = ("auto", "uint8", "bfloat16", "float16", "float32")
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}
AUTO_TARGETS = ("auto", "all-linear")
# -- quality options (issue 28): a finer 4-bit grid, an adapter start from the quantization error,
# layers kept out of 4 bits. Any of them makes the recipe quantize the targets itself.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes 0.50's 4-bit block sizes
ADAPTER_INITS = ("default", "loftq")
# -- end of the quality options
CHECKPOINTING_CHOICES = (True, False, "offload")
# transformers' SchedulerType values (a test keeps the two in step); listed here so
# validating a recipe does not import transformers.
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
)

RECIPE_FILE = "qlora_recipe.json"  # the recipe as saved beside an adapter and in every checkpoint

# Every field a user sets, with its default, in the order the recipe reports them.
DEFAULTS: dict[str, Any] = {
    "preset": "default",
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "target_modules": "auto",
    "exclude_modules": None,
    "lora_on_experts": True,
    "use_rslora": False,
    "use_dora": False,
    "adapter_init": "default",
    "quant_type": "nf4",
    "blocksize": 64,
    "double_quant": True,
    "compute_dtype": "auto",
    "quant_storage": "auto",
    "unquantized_modules": None,
    "optimizer": "paged_adamw_32bit",
    "learning_rate": 2e-4,
    "max_grad_norm": 0.3,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.03,
    "gradient_checkpointing": True,
    "num_train_epochs": None,
    "per_device_train_batch_size": None,
    "gradient_accumulation_steps": None,
    "fast_path": True,
}
RECIPE_FIELDS = tuple(DEFAULTS)
# What each field means, for the dataclass metadata, ``--help`` texts and the README's table.
HELP: dict[str, str] = {
    "preset": "the named preset the recipe started from (`qlora presets` lists them)",
    "r": "LoRA rank: the inner size of each adapter",
    "lora_alpha": "LoRA scaling numerator: adapters are scaled by lora_alpha / r (alias: alpha)",
    "lora_dropout": "dropout on each adapter's input during training (alias: dropout)",
    "target_modules": "'auto' (every linear layer of the language model but heads, routers and vision parts); "
    "a list of module names (q_proj matches model.layers.0.self_attn.q_proj); one name as a string, the same as "
    "a one-name list; any other string, a regular expression over full names, as in PEFT",
    "exclude_modules": "module names (or a pattern) to leave out of the targets",
    "lora_on_experts": "on mixture-of-experts models, LoRA on the fused experts too (their gate_up_proj/down_proj "
    "through PEFT's target_parameters; adapters then train without dropout); False: on the linear layers only. "
    "Experts are stored in 4 bits either way",
    "use_rslora": "rank-stabilised LoRA: scale by lora_alpha / sqrt(r)",
    "use_dora": "weight-decomposed LoRA (DoRA); PEFT's forward, not the fused kernels",
    "adapter_init": "how each adapter starts: 'default', PEFT's (A random, B zero: training starts from the 4-bit "
    "base); 'loftq', the best rank-r approximation of the layer's quantization error (16-bit weight minus its 4-bit "
    "copy, one SVD per layer, divided by the LoRA scaling), so base plus adapter starts nearer the 16-bit model "
    "(LoftQ with one iteration). Loads the base in 16 bits and quantizes the targets itself",
    "quant_type": "4-bit data type of the frozen base",
    "blocksize": "weights per 4-bit block, each block with its own scale: 64 is bitsandbytes' and transformers' "
    "choice; 32 gives each scale half as many weights for about 0.13 more bits per weight. Other than 64, the base "
    "loads in 16 bits and the recipe quantizes the targets itself",
    "double_quant": "quantize the 4-bit blocks' constants too (about 0.37 bits per weight saved)",
    "compute_dtype": "dtype of every GEMM; 'auto' is bfloat16 where the device has it, else float16",
    "quant_storage": "storage dtype of the packed 4-bit weights; 'auto' is uint8, or the compute dtype where FSDP "
    "or DeepSpeed ZeRO-3 shards them",
    "unquantized_modules": "target layers whose frozen base stays in the compute dtype instead of 4 bits (names or a "
    "pattern, as exclude_modules); LoRA still trains on them. For the few layers most sensitive to quantization "
    "(benchmarks/sensitivity.py ranks them). Loads the base in 16 bits and quantizes the other targets itself",
    "optimizer": "the trainer's optimizer (paged: states in memory the driver may move to the host)",
    "learning_rate": "peak learning rate of the schedule",
    "max_grad_norm": "gradient clipping norm (0 turns clipping off)",
    "lr_scheduler_type": "learning-rate schedule (transformers' SchedulerType names)",
    "warmup_ratio": "fraction of the steps spent warming up",
    "gradient_checkpointing": "True: recompute each decoder layer in backward; False: keep activations (fastest, "
    "most memory); 'offload': recompute, with layer inputs parked in pinned host memory",
    "num_train_epochs": "epochs, where the preset fixes them (unset: the trainer's default)",
    "per_device_train_batch_size": "micro-batch size, where the preset fixes it (unset: the trainer's default)",
    "gradient_accumulation_steps": "micro-batches per optimizer step, where the preset fixes it",
    "fast_path": "keep the base in the compute dtype (no fp32 upcasts) and, on CUDA, train through the fused "
    "kernels; False: PEFT's prepare_model_for_kbit_training",
}
CHOICES: dict[str, tuple[Any, ...]] = {
    "quant_type": QUANT_TYPES,
    "blocksize": BLOCKSIZES,
    "adapter_init": ADAPTER_INITS,
    "compute_dtype": COMPUTE_DTYPES,
    "quant_storage": STORAGE_DTYPES,
    "optimizer": OPTIMIZERS,
    "lr_scheduler_type": SCHEDULERS,
    "gradient_checkpointing": CHECKPOINTING_CHOICES,
}


def metadata(name: str) -> dict[str, Any]:
    """The dataclass field metadata of recipe field ``name``: its help, and its choices where it has them."""
    return {"help": HELP[name], **({"choices": CHOICES[name]} if name in CHOICES else {})}


ALIASES = {"alpha": "lora_alpha", "dropout": "lora_dropout", "lora_r": "r"}
BOOLEANS = ("double_quant", "fast_path", "use_rslora", "use_dora", "lora_on_experts")
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAMES_IN_ONE_STRING = re.compile(r"\s*\w+(\s*[,\s]\s*\w+)+\s*")


@dataclass(frozen=True)
class NumberRule:
    """What a numeric field accepts: kind, range, whether it may be unset, and an example fix."""

    fix: str
    integer: bool = False
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    optional: bool = False


NUMBERS = {
    "r": NumberRule("a positive integer such as 16", integer=True, low=1),
    "lora_alpha": NumberRule("a positive number such as 32 (often 2 * r)", low=0, open_low=True),
    "lora_dropout": NumberRule("a number in [0, 1) such as 0.05", low=0, high=1),
    "learning_rate": NumberRule("a positive number such as 2e-4", low=0, open_low=True),
    "max_grad_norm": NumberRule("a number >= 0 such as 0.3 (0 turns clipping off)", low=0),
    "warmup_ratio": NumberRule("a fraction of the steps in [0, 1) such as 0.03", low=0, high=1),
    "num_train_epochs": NumberRule(
        "a positive number such as 3, or leave it unset for the trainer's default", low=0, open_low=True, optional=True
    ),
    "per_device_train_batch_size": NumberRule(
        "a positive integer such as 8, or leave it unset", integer=True, low=0, open_low=True, optional=True
    ),
    "gradient_accumulation_steps": NumberRule(
        "a positive integer such as 2, or leave it unset", integer=True, low=0, open_low=True, optional=True
    ),
}


def field_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Map aliases to field names; reject unknown and doubly given fields."""
    fields: dict[str, Any] = {}
    for key, value in overrides.items():
        name = ALIASES.get(key, key)
        if name not in RECIPE_FIELDS:
            known = sorted([*RECIPE_FIELDS, *ALIASES])
            raise QLoRAConfigError(key, value, "not a recipe field" + nearest(key, known), f"use one of {known}")
        if name != key and name in overrides:
            raise QLoRAConfigError(key, value, f"given twice, also as {name!r}", f"keep only {name!r}")
        fields[name] = value
    return fields


def check_fields(values: dict[str, Any]) -> dict[str, Any]:
    """Return ``values`` (all recipe fields) checked and normalized; raise QLoRAConfigError at the first bad one."""
    checked = dict(values)
    for name, rule in NUMBERS.items():
        checked[name] = number(name, checked[name], rule)
    gradient_checkpointing = checked["gradient_checkpointing"]
    if not isinstance(gradient_checkpointing, (bool, str)) or gradient_checkpointing not in CHECKPOINTING_CHOICES:
        raise QLoRAConfigError(
            "gradient_checkpointing",
            gradient_checkpointing,
            "must be true, false or 'offload'" + nearest(str(gradient_checkpointing), ("offload",)),
            "set gradient_checkpointing=True (recompute, less memory), False (fastest) or 'offload' (least memory)",
        )
    for name in BOOLEANS:
        if not isinstance(checked[name], bool):
            raise QLoRAConfigError(
                name,
                checked[name],
                f"must be true or false, not {type(checked[name]).__name__}",
                f"set {name}=True or False (true / false in YAML)",
            )
    _choice("quant_type", checked["quant_type"], QUANT_TYPES)
    checked["compute_dtype"] = _choice("compute_dtype", checked["compute_dtype"], COMPUTE_DTYPES, DTYPE_ALIASES)
    checked["quant_storage"] = _choice("quant_storage", checked["quant_storage"], STORAGE_DTYPES, DTYPE_ALIASES)
    _choice("optimizer", checked["optimizer"], OPTIMIZERS)
    _choice("lr_scheduler_type", checked["lr_scheduler_type"], SCHEDULERS)
    checked["target_modules"] = modules("target_modules", checked["target_modules"])
    checked["exclude_modules"] = modules("exclude_modules", checked["exclude_modules"])
    checked["blocksize"] = _blocksize(checked["blocksize"])
    _choice("adapter_init", checked["adapter_init"], ADAPTER_INITS)
    if checked["adapter_init"] == "loftq" and checked["use_dora"]:
        raise QLoRAConfigError(
            "adapter_init",
            "loftq",
            "cannot start DoRA adapters: DoRA's magnitudes are set from the layer before the adapter moves",
            "use adapter_init='default' with use_dora=True, or use_dora=False",
        )
    checked["unquantized_modules"] = modules("unquantized_modules", checked["unquantized_modules"])
    return checked


def _blocksize(value: Any) -> int:
    """The 4-bit block size as an integer bitsandbytes takes (a numeric string or whole float counts)."""
    rule = NumberRule(f"one of {list(BLOCKSIZES)} (64 is the default)", integer=True, low=0, open_low=True)
    size = number("blocksize", value, rule)
    if size not in BLOCKSIZES:
        raise QLoRAConfigError(
            "blocksize", value, "is not a 4-bit block size the recipe offers", f"set it to {rule.fix}"
        )
    return int(size)


def quantizes_targets_itself(values: Any) -> bool:
    """True when the recipe (or spec) ``values`` asks for what transformers' 4-bit loading cannot do.

    A block size other than 64, LoftQ adapters or layers kept out of 4 bits: the base then loads in
    16 bits and the recipe's LoRA layer factory quantizes each target as the recipe says.
    """
    return (
        values.blocksize != DEFAULTS["blocksize"]
        or values.adapter_init != DEFAULTS["adapter_init"]
        or bool(values.unquantized_modules)
    )


def number(name: str, value: Any, rule: NumberRule) -> Any:
    """``value`` as the number ``rule`` wants (numeric strings read, whole floats as integers), or raise."""
    if value is None and rule.optional:
        return None
    kind = "an integer" if rule.integer else "a number"
    if isinstance(value, str):
        value = _parse_number(name, value, rule, kind)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise QLoRAConfigError(name, value, f"must be {kind}, not {type(value).__name__}", f"set {name} to {rule.fix}")
    if not math.isfinite(value):
        raise QLoRAConfigError(
            name, value, f"must be a finite number ({value} would poison every weight)", f"set {name} to {rule.fix}"
        )
    if rule.integer:
        if not float(value).is_integer():
            raise QLoRAConfigError(name, value, "must be a whole number", f"set {name} to {rule.fix}")
        value = int(cast("SupportsInt", value))  # typeshed's numbers.Real declares no __int__
    too_low = rule.low is not None and (value <= rule.low if rule.open_low else value < rule.low)
    too_high = rule.high is not None and value >= rule.high
    if too_low or too_high:
        raise QLoRAConfigError(name, value, "is out of range", f"set {name} to {rule.fix}")
    return value


def _parse_number(name: str, text: str, rule: NumberRule, kind: str) -> float | int:
    try:
        return int(text) if text.strip().lstrip("+-").isdigit() else float(text)
    except ValueError:
        raise QLoRAConfigError(
            name, text, f"must be {kind}, and this text is not one", f"set {name} to {rule.fix}"
        ) from None


def modules(name: str, value: Any) -> list[str] | str | None:
    """A target/exclude value normalized: bare names as a list, patterns checked, 'auto' kept."""
    example = {"target_modules": "['q_proj', 'v_proj']", "unquantized_modules": "['model.layers.0.mlp.down_proj']"}.get(
        name, "['lm_head']"
    )
    if name in ("exclude_modules", "unquantized_modules") and not value:
        return None
    if isinstance(value, str):
        text = value.strip()
        if name == "target_modules" and text in AUTO_TARGETS:
            return text
        if _MODULE_NAME.fullmatch(text):
            return [text]
        if _NAMES_IN_ONE_STRING.fullmatch(text):
            names = re.split(r"[\s,]+", text.strip())
            raise QLoRAConfigError(
                name,
                value,
                "is several module names in one string",
                f"write them as a list: {name}={names} (YAML: {name}: [{', '.join(names)}])",
            )
        try:
            re.compile(text)
        except re.error as error:
            raise QLoRAConfigError(
                name,
                value,
                f"is not a valid regular expression ({error})",
                f"give a list of module names such as {example}, or a valid pattern",
            ) from None
        return text
    if isinstance(value, (list, tuple, set)) and value and all(isinstance(v, str) and v.strip() for v in value):
        return [v.strip() for v in (sorted(value) if isinstance(value, set) else value)]
    raise QLoRAConfigError(
        name,
        value,
        "must be 'auto', a module name, a regular expression, or a non-empty list of module names"
        if name == "target_modules"
        else "must be a module name, a regular expression, or a list of module names",
        f"e.g. {name}={example}",
    )


def _choice(name: str, value: Any, choices: tuple[str, ...], aliases: dict[str, str] | None = None) -> Any:
    """``value`` (an alias mapped to its name) if it is one of ``choices``; else raise."""
    if isinstance(value, str) and aliases and aliases.get(value) in choices:
        return aliases[value]
    if isinstance(value, str) and value in choices:
        return value
    raise QLoRAConfigError(
        name, value, "is not supported" + nearest(str(value), choices), f"use one of {list(choices)}"
    )


class RecipeSpec:
    """A checked recipe as plain values: what :class:`QLoRARecipe` holds, without PEFT.

    The quick subcommands work from it; :func:`qlora_plugin.core.recipe.recipe_from_spec` gives the real recipe.
    """

    def __init__(self, **values: Any) -> None:
        self.__dict__["_values"] = check_fields({**DEFAULTS, **field_overrides(values)})

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def targets_are_auto(self) -> bool:
        """True while the targets are still to be discovered on a model."""
        return isinstance(self.target_modules, str) and self.target_modules in AUTO_TARGETS

    def recipe_fields(self) -> dict[str, Any]:
        """The fields as plain data, as :meth:`QLoRARecipe.recipe_fields` gives them."""
        values = dict(self.__dict__["_values"])
        values["target_modules"] = "auto" if self.targets_are_auto else values["target_modules"]
        return values

    def replace(self, **changes: Any) -> RecipeSpec:
        """A new spec with ``changes`` applied (checked like any other)."""
        return RecipeSpec(**{**self.recipe_fields(), **changes})


def recipe_spec(preset: str = "default", **overrides: Any) -> RecipeSpec:
    """The light twin of :func:`qlora_plugin.core.recipe.qlora_recipe`: a preset plus overrides, checked."""
    return RecipeSpec(**{**preset_fields(preset), **field_overrides(overrides), "preset": preset})
