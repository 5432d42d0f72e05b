"""QLoRARecipe: the single source of truth for a QLoRA run.

A recipe is a ``peft.LoraConfig`` (so TRL's ``SFTTrainer`` takes it as its
``peft_config``) that also carries the quantization of the base and the
training settings QLoRA depends on. It converts to each library's own objects:
``bnb_config()`` -> transformers, ``lora_config()`` -> PEFT,
``training_args()`` / ``sft_config()`` -> transformers / TRL.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from numbers import Real
from typing import TYPE_CHECKING, Any

from peft import LoraConfig

from qlora_plugin.errors import QLoRAConfigError, nearest
from qlora_plugin.targets import AUTO_EXCLUDE_PATTERN

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel
    from trl import SFTConfig

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
STORAGE_DTYPES = ("uint8", "bfloat16", "float16", "float32")
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}
AUTO_TARGETS = ("auto", "all-linear")
CHECKPOINTING_CHOICES = (True, False, "offload")
RECIPE_FILE = "qlora_recipe.json"


@dataclass
class QLoRARecipe(LoraConfig):
    """Everything that makes a run QLoRA, in one object.

    LoRA fields keep PEFT's names (``r``, ``lora_alpha``, ``lora_dropout``,
    ``target_modules``, ``exclude_modules``, ``use_rslora``, ``use_dora``);
    :func:`qlora_recipe` also accepts ``alpha`` and ``dropout``.
    ``target_modules="auto"`` means: discover them on the model (see
    :mod:`qlora_plugin.targets`).
    """

    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | str | None = "auto"
    task_type: str | None = "CAUSAL_LM"
    preset: str = field(default="default", metadata={"help": "the preset the recipe started from"})
    quant_type: str = field(default="nf4", metadata={"help": "4-bit data type: nf4 or fp4"})
    double_quant: bool = field(default=True, metadata={"help": "quantize the block constants too"})
    compute_dtype: str = field(default="auto", metadata={"help": "auto, bfloat16, float16, float32"})
    quant_storage: str = field(default="uint8", metadata={"help": "storage dtype; bfloat16 for FSDP"})
    optimizer: str = field(default="paged_adamw_32bit", metadata={"help": "trainer optimizer name"})
    learning_rate: float = 2e-4
    max_grad_norm: float = 0.3
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    gradient_checkpointing: bool | str = field(
        default=True,
        metadata={"help": "True: recompute each decoder layer in backward; False: keep activations (fastest, "
                          "most memory); 'offload': recompute, with layer inputs parked in pinned host memory"},
    )
    num_train_epochs: float | None = None
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    fast_path: bool = field(
        default=True,
        metadata={"help": "keep the base in the compute dtype (no fp32 upcasts) and, on CUDA, train through the "
                          "fused kernels of qlora_plugin.kernels; False: PEFT's stock preparation"},
    )

    def __post_init__(self) -> None:
        _validate(self)
        self.compute_dtype = DTYPE_ALIASES.get(self.compute_dtype, self.compute_dtype)
        self.quant_storage = DTYPE_ALIASES.get(self.quant_storage, self.quant_storage)
        self._user_exclude_modules = self.exclude_modules
        self._resolved_by_peft = self.targets_are_auto
        if self.targets_are_auto:
            # PEFT resolves "all-linear" on the model it wraps; the pattern adds
            # the rest of the built-in rule (routers, vision parts).
            self.target_modules = "all-linear"
            self.exclude_modules = _combine_exclusions(self.exclude_modules)
        super().__post_init__()
        self._register_lora_layer_factory()

    # -- views -----------------------------------------------------------------

    @property
    def targets_are_auto(self) -> bool:
        """True while the targets are still to be discovered on a model."""
        return isinstance(self.target_modules, str) and self.target_modules in AUTO_TARGETS

    def recipe_fields(self) -> dict[str, Any]:
        """The recipe as plain data: the fields a user sets, as they set them."""
        values = {name: getattr(self, name) for name in RECIPE_FIELDS}
        values["target_modules"] = "auto" if self.targets_are_auto else _plain(self.target_modules)
        values["exclude_modules"] = _plain(self._user_exclude_modules)
        return values

    def replace(self, **changes: Any) -> QLoRARecipe:
        """A new recipe with ``changes`` applied (validated like any other)."""
        return QLoRARecipe(**{**self.recipe_fields(), **_field_overrides(changes)})

    def to_dict(self) -> dict[str, Any]:
        """PEFT's view: only LoRA fields, so adapter_config.json loads anywhere."""
        return {key: value for key, value in super().to_dict().items() if key in LORA_FIELDS}

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write adapter_config.json (plain LoRA) and qlora_recipe.json beside it."""
        super().save_pretrained(save_directory, **kwargs)
        with open(os.path.join(save_directory, RECIPE_FILE), "w", encoding="utf-8") as handle:
            json.dump(self.recipe_fields(), handle, indent=2, sort_keys=True)

    # -- conversions -------------------------------------------------------------

    def resolved_compute_dtype(self, device: str | None = None) -> torch.dtype:
        """The compute dtype on ``device`` (default: the device training would use)."""
        from qlora_plugin.device import resolve_compute_dtype

        return resolve_compute_dtype(self.compute_dtype, device)

    def bnb_config(self, device: str | None = None) -> Any:
        """transformers' ``BitsAndBytesConfig`` for loading the base in 4 bits."""
        from qlora_plugin.quantization import bnb_config

        return bnb_config(self, self.resolved_compute_dtype(device))

    def quantization_config(self, device: str | None = None) -> Any:
        """The quantization config from the plugins (bitsandbytes unless one overrides it)."""
        from qlora_plugin.plugins import plugin_manager

        return plugin_manager().hook.qlora_quantization_config(
            recipe=self, compute_dtype=self.resolved_compute_dtype(device)
        )

    def lora_config(self) -> LoraConfig:
        """The LoRA part as a plain ``peft.LoraConfig``."""
        init_fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
        return LoraConfig(**{k: v for k, v in self.to_dict().items() if k in init_fields})

    def training_args(self, device: str | None = None) -> dict[str, Any]:
        """The recipe's trainer settings as ``TrainingArguments`` keyword arguments."""
        from qlora_plugin.training import training_args

        return training_args(self, device)

    def optimizer_cls_and_kwargs(self, args: Any = None) -> tuple[type, dict[str, Any]] | None:
        """The fused paged AdamW for a trainer's ``optimizer_cls_and_kwargs=`` (CUDA fast path), else None.

        ``args``: the trainer's arguments (learning rate, betas, eps are read from them).
        """
        from qlora_plugin.speed import optimizer_cls_and_kwargs

        return optimizer_cls_and_kwargs(self, args)

    def sft_config(self, **overrides: Any) -> SFTConfig:
        """A TRL ``SFTConfig`` with the recipe's settings; ``overrides`` win (and are logged)."""
        from qlora_plugin.trl import sft_config

        return sft_config(self, **overrides)

    # -- models ------------------------------------------------------------------

    def resolve(self, model: nn.Module | str | os.PathLike[str]) -> QLoRARecipe:
        """A copy whose ``target_modules`` are the exact names found on ``model``.

        ``model`` is a loaded model, or a path / hub id whose config is built on
        the meta device (no weights are read). Explicit targets are checked
        against the model's linear layers instead.
        """
        from qlora_plugin.models import as_model
        from qlora_plugin.targets import check_targets_exist, discover_targets

        module = as_model(model)
        if not self.targets_are_auto:
            check_targets_exist(module, self.target_modules)
            return self
        return self.replace(target_modules=discover_targets(module, self))

    def load_model(self, path: str | os.PathLike[str], **kwargs: Any) -> PreTrainedModel:
        """Load a causal LM with its base in 4 bits, ready for the adapters."""
        from qlora_plugin.models import load_quantized

        return load_quantized(path, self, **kwargs)

    def _register_lora_layer_factory(self) -> None:
        from qlora_plugin.patches import allowed

        if not allowed("peft-lora-layer-factory"):
            return
        import torch
        from transformers.pytorch_utils import Conv1D

        from qlora_plugin.lora_layers import make_lora_layer

        self._register_custom_module({torch.nn.Linear: make_lora_layer, Conv1D: make_lora_layer})


LORA_FIELDS = frozenset(f.name for f in dataclasses.fields(LoraConfig))
RECIPE_FIELDS = (
    "preset",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "use_rslora",
    "use_dora",
    *(f.name for f in dataclasses.fields(QLoRARecipe) if f.name not in LORA_FIELDS and f.name != "preset"),
)
ALIASES = {"alpha": "lora_alpha", "dropout": "lora_dropout", "lora_r": "r"}


def qlora_recipe(preset: str = "default", *, model: Any = None, **overrides: Any) -> QLoRARecipe:
    """Make a recipe from a named preset plus keyword overrides.

    ``qlora_recipe()``, ``qlora_recipe("paper", r=32)``. Presets come from the
    plugins (see ``qlora_plugin.presets``). With ``model`` (a loaded model or a
    path), the target modules are discovered on it now.
    """
    from qlora_plugin.presets import preset_fields

    fields = {**preset_fields(preset), **_field_overrides(overrides), "preset": preset}
    recipe = QLoRARecipe(**fields)
    return recipe.resolve(model) if model is not None else recipe


def _field_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
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


def _plain(value: Any) -> Any:
    """Sets and tuples of names as sorted lists (JSON- and YAML-friendly)."""
    return sorted(value) if isinstance(value, (set, list, tuple)) else value


def _combine_exclusions(user: str | list[str] | set[str] | None) -> str:
    """One regular expression: the built-in exclusions plus the user's."""
    if not user:
        return AUTO_EXCLUDE_PATTERN
    if isinstance(user, str):
        return f"{AUTO_EXCLUDE_PATTERN}|(?:{user})"
    import re

    names = "|".join(re.escape(name) for name in sorted(user))
    return f"{AUTO_EXCLUDE_PATTERN}|(?:.*\\.)?(?:{names})"


# -- validation ------------------------------------------------------------------


def _validate(recipe: QLoRARecipe) -> None:
    """Check every recipe field; raise QLoRAConfigError naming the first bad one."""
    _number(recipe, "r", integer=True, low=1, fix="a positive integer such as 16")
    _number(recipe, "lora_alpha", low=0, open_low=True, fix="a positive number such as 2 * r")
    _number(recipe, "lora_dropout", low=0, high=1, fix="a number in [0, 1) such as 0.05")
    _number(recipe, "learning_rate", low=0, open_low=True, fix="a positive number such as 2e-4")
    _number(recipe, "max_grad_norm", low=0, fix="a number >= 0 such as 0.3 (0 turns clipping off)")
    _number(recipe, "warmup_ratio", low=0, high=1, fix="a fraction of the steps in [0, 1) such as 0.03")
    for name in ("num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(recipe, name) is not None:
            _number(recipe, name, integer=name != "num_train_epochs", low=0, open_low=True,
                    fix="a positive number, or None for the trainer's default")
    if recipe.gradient_checkpointing not in CHECKPOINTING_CHOICES or not isinstance(
        recipe.gradient_checkpointing, (bool, str)
    ):
        raise QLoRAConfigError(
            "gradient_checkpointing", recipe.gradient_checkpointing,
            "must be true, false or 'offload'" + nearest(str(recipe.gradient_checkpointing), ("offload",)),
            "set gradient_checkpointing=True (recompute, less memory), False (fastest) or 'offload' (least memory)",
        )
    for name in ("double_quant", "fast_path", "use_rslora"):
        if not isinstance(getattr(recipe, name), bool):
            raise QLoRAConfigError(name, getattr(recipe, name), "must be true or false", f"set {name}=True or False")
    if not isinstance(recipe.use_dora, bool):
        raise QLoRAConfigError("use_dora", recipe.use_dora, "must be true or false", "set use_dora=True or False")
    _choice(recipe, "quant_type", QUANT_TYPES)
    _choice(recipe, "compute_dtype", COMPUTE_DTYPES, DTYPE_ALIASES)
    _choice(recipe, "quant_storage", STORAGE_DTYPES, DTYPE_ALIASES)
    _choice(recipe, "optimizer", OPTIMIZERS)
    from transformers.trainer_utils import SchedulerType

    _choice(recipe, "lr_scheduler_type", tuple(kind.value for kind in SchedulerType))
    _check_modules(recipe)


def _number(recipe: QLoRARecipe, name: str, *, fix: str, integer: bool = False, low: float | None = None,
            high: float | None = None, open_low: bool = False) -> None:
    value = getattr(recipe, name)
    kind_ok = isinstance(value, int) if integer else isinstance(value, Real)
    if isinstance(value, bool) or not kind_ok:
        kind = "an integer" if integer else "a number"
        raise QLoRAConfigError(name, value, f"must be {kind}, not {type(value).__name__}", f"set {name} to {fix}")
    too_low = low is not None and (value <= low if open_low else value < low)
    too_high = high is not None and value >= high
    if too_low or too_high:
        raise QLoRAConfigError(name, value, "is out of range", f"set {name} to {fix}")


def _choice(recipe: QLoRARecipe, name: str, choices: tuple[str, ...], aliases: dict[str, str] | None = None) -> None:
    value = getattr(recipe, name)
    if value in choices or (aliases and value in aliases and aliases[value] in choices):
        return
    raise QLoRAConfigError(
        name, value, "is not supported" + nearest(str(value), choices), f"use one of {list(choices)}"
    )


def _check_modules(recipe: QLoRARecipe) -> None:
    for name in ("target_modules", "exclude_modules"):
        value = getattr(recipe, name)
        if name == "exclude_modules" and not value:
            continue
        if isinstance(value, str) and value:
            continue
        if isinstance(value, (list, tuple, set)) and value and all(isinstance(v, str) and v for v in value):
            continue
        raise QLoRAConfigError(
            name, value, "must be 'auto', a module name pattern, or a non-empty list of module names",
            f"e.g. {name}=['q_proj', 'v_proj']" if name == "target_modules" else f"e.g. {name}=['lm_head']",
        )
