"""QLoRARecipe: the single source of truth for a QLoRA run.

A recipe is a ``peft.LoraConfig`` (so TRL's ``SFTTrainer`` takes it as its
``peft_config``) that also carries the quantization of the base and the
training settings QLoRA depends on. It converts to each library's own objects:
``bnb_config()`` -> transformers, ``lora_config()`` -> PEFT,
``training_args()`` / ``sft_config()`` -> transformers / TRL.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from peft import LoraConfig

from qlora_plugin.core import seams
from qlora_plugin.core.device import resolve_compute_dtype
from qlora_plugin.core.experts import expert_target_parameters
from qlora_plugin.core.fields import (  # noqa: F401 - the names recipe users import from here
    ALIASES,
    AUTO_TARGETS,
    CHECKPOINTING_CHOICES,
    COMPUTE_DTYPES,
    DEFAULTS,
    DTYPE_ALIASES,
    OPTIMIZERS,
    QUANT_TYPES,
    RECIPE_FIELDS,
    RECIPE_FILE,
    STORAGE_DTYPES,
    check_fields,
    field_overrides,
    metadata,
    quantizes_targets_itself,
)
from qlora_plugin.core.plugins import discover_targets, preset_fields
from qlora_plugin.core.plugins import quantization_config as plugins_quantization_config
from qlora_plugin.core.quantization_config import bnb_config as bitsandbytes_config
from qlora_plugin.core.run_record import record_fields
from qlora_plugin.core.safe_io import write_text_atomically
from qlora_plugin.core.targets import AUTO_EXCLUDE_PATTERN, check_targets_exist, user_excluded

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel
    from trl import SFTConfig

_log = logging.getLogger("qlora_plugin")


def _inherited(name: str) -> dict[str, Any]:
    """Metadata of a field the recipe redeclares from ``LoraConfig``, with the recipe's help.

    PEFT's own metadata stays: PEFT reads flags such as ``is_lora_variant`` back from the dataclass.
    """
    return {**LoraConfig.__dataclass_fields__[name].metadata, **metadata(name)}


@dataclass
class QLoRARecipe(LoraConfig):
    """Everything that makes a run QLoRA, in one object.

    LoRA fields keep PEFT's names (``r``, ``lora_alpha``, ``lora_dropout``,
    ``target_modules``, ``exclude_modules``, ``use_rslora``, ``use_dora``);
    :func:`qlora_recipe` also accepts ``alpha`` and ``dropout``.
    ``target_modules="auto"`` means: discover them on the model (see
    :mod:`qlora_plugin.core.targets`). The recipe is data: what a run decides
    (launch, sharding, seed, device) lives in its run context
    (:mod:`qlora_plugin.build.context`), never on the recipe.
    """

    r: int = field(default=DEFAULTS["r"], metadata=_inherited("r"))
    # PEFT's LoraConfig annotates lora_alpha as int (it takes a float) and task_type as TaskType
    # (it takes the task's name): the recipe's wider annotations are on purpose.
    lora_alpha: float = field(  # type: ignore[assignment]
        default=DEFAULTS["lora_alpha"], metadata=_inherited("lora_alpha")
    )
    lora_dropout: float = field(default=DEFAULTS["lora_dropout"], metadata=_inherited("lora_dropout"))
    target_modules: list[str] | str | None = field(
        default=DEFAULTS["target_modules"], metadata=_inherited("target_modules")
    )
    exclude_modules: list[str] | str | None = field(
        default=DEFAULTS["exclude_modules"], metadata=_inherited("exclude_modules")
    )
    lora_on_experts: bool = field(default=DEFAULTS["lora_on_experts"], metadata=metadata("lora_on_experts"))
    use_rslora: bool = field(default=DEFAULTS["use_rslora"], metadata=_inherited("use_rslora"))
    use_dora: bool = field(default=DEFAULTS["use_dora"], metadata=_inherited("use_dora"))
    adapter_init: str = field(default=DEFAULTS["adapter_init"], metadata=metadata("adapter_init"))
    task_type: str | None = field(  # type: ignore[assignment]
        default="CAUSAL_LM", metadata={"help": "PEFT's task type; QLoRA here trains causal language models"}
    )
    preset: str = field(default=DEFAULTS["preset"], metadata=metadata("preset"))
    quant_type: str = field(default=DEFAULTS["quant_type"], metadata=metadata("quant_type"))
    blocksize: int = field(default=DEFAULTS["blocksize"], metadata=metadata("blocksize"))
    double_quant: bool = field(default=DEFAULTS["double_quant"], metadata=metadata("double_quant"))
    compute_dtype: str = field(default=DEFAULTS["compute_dtype"], metadata=metadata("compute_dtype"))
    quant_storage: str = field(default=DEFAULTS["quant_storage"], metadata=metadata("quant_storage"))
    unquantized_modules: list[str] | str | None = field(
        default=DEFAULTS["unquantized_modules"], metadata=metadata("unquantized_modules")
    )
    optimizer: str = field(default=DEFAULTS["optimizer"], metadata=metadata("optimizer"))
    learning_rate: float = field(default=DEFAULTS["learning_rate"], metadata=metadata("learning_rate"))
    max_grad_norm: float = field(default=DEFAULTS["max_grad_norm"], metadata=metadata("max_grad_norm"))
    lr_scheduler_type: str = field(default=DEFAULTS["lr_scheduler_type"], metadata=metadata("lr_scheduler_type"))
    warmup_ratio: float = field(default=DEFAULTS["warmup_ratio"], metadata=metadata("warmup_ratio"))
    gradient_checkpointing: bool | str = field(
        default=DEFAULTS["gradient_checkpointing"], metadata=metadata("gradient_checkpointing")
    )
    num_train_epochs: float | None = field(default=DEFAULTS["num_train_epochs"], metadata=metadata("num_train_epochs"))
    per_device_train_batch_size: int | None = field(
        default=DEFAULTS["per_device_train_batch_size"], metadata=metadata("per_device_train_batch_size")
    )
    gradient_accumulation_steps: int | None = field(
        default=DEFAULTS["gradient_accumulation_steps"], metadata=metadata("gradient_accumulation_steps")
    )
    fast_path: bool = field(default=DEFAULTS["fast_path"], metadata=metadata("fast_path"))

    def __post_init__(self) -> None:
        checked = check_fields({name: getattr(self, name) for name in RECIPE_FIELDS})
        for name, value in checked.items():
            setattr(self, name, value)
        self._user_exclude_modules = self.exclude_modules
        self._resolved_by_peft = self.targets_are_auto
        if self.targets_are_auto:
            # PEFT resolves "all-linear" on the model it wraps; the pattern adds
            # the rest of the built-in rule (routers, vision parts).
            self.target_modules = "all-linear"
            self.exclude_modules = _combine_exclusions(self.exclude_modules)
        super().__post_init__()
        # PEFT builds each LoRA layer through the factory the build layer registers (qlora_plugin.core.seams)
        seams.call("lora_layer_factory", self)

    # -- views -----------------------------------------------------------------

    @property
    def targets_are_auto(self) -> bool:
        """True while the targets are still to be discovered on a model."""
        return isinstance(self.target_modules, str) and self.target_modules in AUTO_TARGETS

    @property
    def quantizes_targets_itself(self) -> bool:
        """True when the base loads in 16 bits and the LoRA layer factory quantizes each target.

        Set by ``blocksize`` other than 64, ``adapter_init='loftq'`` or ``unquantized_modules``
        (:func:`qlora_plugin.core.fields.quantizes_targets_itself`).
        """
        return quantizes_targets_itself(self)

    def recipe_fields(self) -> dict[str, Any]:
        """The recipe as plain data: the fields a user sets, as they set them."""
        values = {name: getattr(self, name) for name in RECIPE_FIELDS}
        values["target_modules"] = "auto" if self.targets_are_auto else _plain(self.target_modules)
        values["exclude_modules"] = _plain(self._user_exclude_modules)
        values["unquantized_modules"] = _plain(self.unquantized_modules)
        return values

    def replace(self, **changes: Any) -> QLoRARecipe:
        """A new recipe with ``changes`` applied (validated like any other).

        PEFT's own fields that are no recipe field (``bias``, ``modules_to_save``,
        ``layers_to_transform``, ``rank_pattern``, ...) are carried over as they are.
        """
        inherited = {
            f.name: copy.deepcopy(getattr(self, f.name))
            for f in dataclasses.fields(LoraConfig)
            if f.init and f.name not in RECIPE_FIELDS and f.name not in _SET_BY_THE_RECIPE
        }
        return type(self)(**{**inherited, **self.recipe_fields(), **field_overrides(changes)})

    def to_dict(self) -> dict[str, Any]:
        """PEFT's view: only LoRA fields, so adapter_config.json loads anywhere."""
        return {key: value for key, value in super().to_dict().items() if key in LORA_FIELDS}

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write adapter_config.json (plain LoRA) and qlora_recipe.json beside it (what the model trained on)."""
        record_fields(self)  # a recipe whose models disagree on their 4-bit format fails before anything is written
        super().save_pretrained(save_directory, **kwargs)
        write_recipe_file(self, save_directory)

    # -- conversions -------------------------------------------------------------

    def resolved_compute_dtype(self, device: str | None = None) -> torch.dtype:
        """The compute dtype on ``device`` (default: the device training would use)."""
        return resolve_compute_dtype(self.compute_dtype, device)

    def bnb_config(self, device: str | None = None) -> Any:
        """transformers' ``BitsAndBytesConfig`` for loading the base in 4 bits.

        The packed weights' storage dtype is decided for the recipe's run
        (:func:`qlora_plugin.build.quantization.storage_dtype`, through :mod:`qlora_plugin.core.seams`).
        """
        compute_dtype = self.resolved_compute_dtype(device)
        return bitsandbytes_config(self, compute_dtype, seams.call("storage_dtype", self, compute_dtype))

    def quantization_config(self, device: str | None = None) -> Any:
        """The quantization config from the plugins (bitsandbytes unless one overrides it).

        ``None`` where the recipe quantizes the targets itself (:attr:`quantizes_targets_itself`):
        the base then loads in 16 bits.
        """
        if self.quantizes_targets_itself:
            return None
        compute_dtype = self.resolved_compute_dtype(device)
        return plugins_quantization_config(self, compute_dtype, seams.call("storage_dtype", self, compute_dtype))

    def lora_config(self) -> LoraConfig:
        """The LoRA part as a plain ``peft.LoraConfig``."""
        init_fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
        return LoraConfig(**{k: v for k, v in self.to_dict().items() if k in init_fields})

    def training_args(self, device: str | None = None) -> dict[str, Any]:
        """The recipe's trainer settings as ``TrainingArguments`` keyword arguments.

        Made by :mod:`qlora_plugin.integrations.transformers` (through :mod:`qlora_plugin.core.seams`).
        """
        return seams.call("training_args", self, device)

    def optimizer_cls_and_kwargs(self, args: Any = None) -> tuple[type, dict[str, Any]] | None:
        """The fused paged AdamW for a trainer's ``optimizer_cls_and_kwargs=`` (CUDA fast path), else None.

        ``args``: the trainer's arguments (learning rate, betas, eps are read from them). Made by
        :mod:`qlora_plugin.fastpath.optimizer` (through :mod:`qlora_plugin.core.seams`).
        """
        return seams.call("optimizer_cls_and_kwargs", self, args)

    def sft_config(self, /, **overrides: Any) -> SFTConfig:
        """A TRL ``SFTConfig`` with the recipe's settings; ``overrides`` win (and are logged).

        Made by :mod:`qlora_plugin.integrations.trl` (through :mod:`qlora_plugin.core.seams`).
        """
        return seams.call("sft_config", self, **overrides)

    def callbacks(self) -> list[Any]:
        """Trainer callbacks for ``SFTTrainer(..., callbacks=recipe.callbacks())``: checkpoints complete or
        absent, each with ``qlora_recipe.json``, and a resume that skips an incomplete one
        (:class:`qlora_plugin.integrations.checkpoints.CheckpointGuard`, through :mod:`qlora_plugin.core.seams`)."""
        return list(seams.call("callbacks", self))

    # -- models ------------------------------------------------------------------

    def resolve(self, model: nn.Module | str | os.PathLike[str]) -> QLoRARecipe:
        """A copy whose ``target_modules`` are the exact names found on ``model``.

        ``model`` is a loaded model, or a path / hub id whose config is built on
        the meta device (no weights are read; :func:`qlora_plugin.build.models.meta_model`
        through :mod:`qlora_plugin.core.seams`); a PEFT model counts as its base (its LoRA
        layers as the linear layers they wrap). Explicit names are checked against the
        model's linear layers; a pattern becomes the names it matches.
        """
        module = seams.call("meta_model", model) if isinstance(model, (str, os.PathLike)) else _base_of(model)
        if self.targets_are_auto:
            resolved = self.replace(target_modules=discover_targets(module, self))
        else:
            assert self.target_modules is not None  # the field checks never leave it None
            named = check_targets_exist(module, self.target_modules)
            resolved = self.replace(target_modules=named) if isinstance(self.target_modules, str) else self
        return resolved._with_experts(module)

    def _with_experts(self, module: nn.Module) -> QLoRARecipe:
        """This recipe with the fused MoE experts of ``module`` in ``target_parameters`` (``lora_on_experts``).

        PEFT's LoRA over a parameter (``ParamWrapper``) has no dropout, and PEFT refuses to load
        such an adapter saved with one: where experts are targeted, ``lora_dropout`` is 0.
        """
        names = expert_target_parameters(module) if self.lora_on_experts else []
        exclude = self._user_exclude_modules
        names = [n for n in names if not (user_excluded(n, exclude) or user_excluded(n.rpartition(".")[0], exclude))]
        if not names:
            return self
        resolved = self.replace(lora_dropout=0.0)
        if self.lora_dropout:
            _log.warning(
                "qlora: LoRA on %d fused MoE expert parameters trains without dropout (PEFT's target_parameters "
                "format has none), so lora_dropout=%s becomes 0 for all adapters (set lora_on_experts=False to keep "
                "dropout and LoRA on the linear layers only)",
                len(names),
                self.lora_dropout,
            )
        resolved.target_parameters = names
        return resolved

    def load_model(self, path: str | os.PathLike[str], **kwargs: Any) -> PreTrainedModel:
        """Load a causal LM with its base in 4 bits, ready for the adapters.

        Made by :func:`qlora_plugin.build.models.load_quantized` (through :mod:`qlora_plugin.core.seams`).
        """
        return seams.call("load_model", path, self, **kwargs)


LORA_FIELDS = frozenset(f.name for f in dataclasses.fields(LoraConfig))
# LoraConfig fields the recipe derives itself in __post_init__ (PEFT fills the rest from the model).
_SET_BY_THE_RECIPE = frozenset({"peft_type", "target_parameters"})


def recipe_from_spec(spec: Any) -> QLoRARecipe:
    """The :class:`QLoRARecipe` with the fields of a checked :class:`~qlora_plugin.core.fields.RecipeSpec`."""
    return QLoRARecipe(**spec.recipe_fields())


def qlora_recipe(preset: str = "default", *, model: Any = None, **overrides: Any) -> QLoRARecipe:
    """Make a recipe from a named preset plus keyword overrides.

    ``qlora_recipe()``, ``qlora_recipe("paper", r=32)``. Presets come from the
    plugins (see ``qlora_plugin.core.presets``). With ``model`` (a loaded model or a
    path), the target modules are discovered on it now.
    """
    fields = {**preset_fields(preset), **field_overrides(overrides), "preset": preset}
    recipe = QLoRARecipe(**fields)
    return recipe.resolve(model) if model is not None else recipe


def write_recipe_file(recipe: QLoRARecipe, directory: str | os.PathLike[str], model: Any = None) -> None:
    """Write ``qlora_recipe.json`` into ``directory`` through a temporary file, so it is whole or absent.

    The record is what ``model`` trained on (:func:`qlora_plugin.core.run_record.record_fields`):
    its 4-bit format, rank and adapted layers in place of the recipe's intention.
    """
    text = json.dumps(record_fields(recipe, model), indent=2, sort_keys=True)
    write_text_atomically(os.path.join(os.fspath(directory), RECIPE_FILE), text)


def _base_of(model: nn.Module) -> nn.Module:
    """A PEFT model's base model (its LoRA layers count as the linear layers they wrap), or ``model`` itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) and hasattr(model, "peft_config") else model


def _plain(value: Any) -> Any:
    """Sets and tuples of names as sorted lists (JSON- and YAML-friendly)."""
    return sorted(value) if isinstance(value, (set, list, tuple)) else value


def _combine_exclusions(user: str | list[str] | set[str] | None) -> str:
    """One regular expression: the built-in exclusions plus the user's."""
    if not user:
        return AUTO_EXCLUDE_PATTERN
    if isinstance(user, str):
        return f"{AUTO_EXCLUDE_PATTERN}|(?:{user})"
    names = "|".join(re.escape(name) for name in sorted(user))
    return f"{AUTO_EXCLUDE_PATTERN}|(?:.*\\.)?(?:{names})"
