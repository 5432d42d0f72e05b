"""What a run trained on, read from the model: the record ``qlora_recipe.json`` keeps, and the comparisons with it.

A recipe says what a run should do; the model says what it did. A model loaded in
FP4 by hand and trained with the default (NF4) recipe trains over FP4, so the record
is taken from the model wherever one is at hand: the 4-bit format of its base layers
(data type, block size, double quantization, compute and storage dtype) and its
adapters (rank and the names of the adapted layers). Where no model is passed (PEFT
saving an adapter calls ``recipe.save_pretrained``), the LoRA layers the recipe built
in this process speak for it (:func:`note_built_layer`). ``qlora merge`` and a resume
then compare that record with what they load (:func:`compare_record`).
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from qlora_plugin.core.errors import QLoRAConfigError

PEFT_PREFIX = "base_model.model."
_built: weakref.WeakKeyDictionary[Any, tuple[Any, str]] = weakref.WeakKeyDictionary()  # LoRA layer -> (recipe, name)


@dataclass(frozen=True)
class BaseFormat:
    """The 4-bit format of a base model's linear layers, as bitsandbytes holds them."""

    quant_type: str
    blocksize: int
    double_quant: bool
    compute_dtype: str
    quant_storage: str

    @classmethod
    def of_layer(cls, layer: Any) -> BaseFormat | None:
        """The format of a bitsandbytes ``Linear4bit`` (or a LoRA layer over one), None for any other layer."""
        layer = getattr(layer, "base_layer", layer)
        weight: Any = getattr(layer, "weight", None)  # bitsandbytes' Params4bit, where it is one
        quant_type = getattr(weight, "quant_type", None)
        if quant_type not in ("nf4", "fp4") or not hasattr(weight, "compress_statistics"):
            return None
        return cls(
            quant_type=str(quant_type),
            blocksize=int(weight.blocksize),
            double_quant=bool(weight.compress_statistics),
            compute_dtype=_dtype_name(getattr(layer, "compute_dtype", None)),
            quant_storage=_dtype_name(getattr(weight, "quant_storage", None)),
        )

    def describe(self) -> str:
        return (
            f"{self.quant_type} (blocksize {self.blocksize}, double quant {self.double_quant}, "
            f"compute {self.compute_dtype}, storage {self.quant_storage})"
        )


def note_built_layer(layer: Any, recipe: Any, name: str | None) -> None:
    """Remember that ``recipe`` built ``layer`` for the module ``name`` (weakly: a freed model drops out)."""
    _built[layer] = (recipe, name or "")


def model_format(model: Any) -> BaseFormat | None:
    """The 4-bit format of ``model``'s base layers, or None where it has none; mixed formats are an error."""
    return _one_format([BaseFormat.of_layer(module) for module in model.modules()], type(model).__name__)


def record_fields(recipe: Any, model: Any = None) -> dict[str, Any]:
    """The fields ``qlora_recipe.json`` records: the recipe's, with what the model trained on in their place.

    ``model``: the model that trained (a PEFT model, or the 4-bit base before its adapters); None
    reads the LoRA layers ``recipe`` built in this process. ``recorded_from`` says which spoke.
    """
    fields = dict(recipe.recipe_fields())
    if model is not None:
        layers = [(_strip(name), module) for name, module in model.named_modules()]
        where = type(model).__name__
    else:
        layers = [(name, layer) for layer, (owner, name) in list(_built.items()) if owner is recipe]
        where = "the models this recipe built"
    base = _one_format([BaseFormat.of_layer(module) for _, module in layers], where)
    adapters = {name: module for name, module in layers if _is_lora(module)}
    if base is None and not adapters:
        return {**fields, "recorded_from": "recipe"}
    if base is not None:
        fields.update({key: value for key, value in asdict(base).items()})
    if adapters:
        ranks = Counter(_rank(module) for module in adapters.values())
        fields["r"] = ranks.most_common(1)[0][0]
        if len(ranks) > 1:
            fields["ranks"] = {name: _rank(module) for name, module in sorted(adapters.items())}
        on_layers = sorted(name for name, module in adapters.items() if not hasattr(module, "parameter_name"))
        on_parameters = sorted(  # PEFT's ParamWrapper (target_parameters: fused MoE experts), nested per parameter
            f"{name.replace('.base_layer', '')}.{module.parameter_name}"
            for name, module in adapters.items()
            if hasattr(module, "parameter_name")
        )
        if on_layers:
            fields["target_modules"] = on_layers
        if on_parameters:
            fields["target_parameters"] = on_parameters
    return {**fields, "recorded_from": "model"}


def compare_record(fields: dict[str, Any], loaded: BaseFormat, record: str, loaded_from: str, fix: str) -> None:
    """Raise one line naming both values where a record (``qlora_recipe.json``'s fields) and what was loaded differ.

    The data type, double quantization and, where the record has it, the block size are compared:
    the three that make the dequantized base another model.
    """
    for key in ("quant_type", "double_quant", "blocksize"):
        if key in fields and fields[key] != getattr(loaded, key):
            raise QLoRAConfigError(
                key,
                getattr(loaded, key),
                f"{loaded_from} is {loaded.describe()}, but {record} records {key}={fields[key]!r}",
                fix,
            )


def _one_format(found: list[BaseFormat | None], where: str) -> BaseFormat | None:
    formats = Counter(f for f in found if f is not None)
    if len(formats) > 1:
        described = "; ".join(f"{f.describe()} on {n} layers" for f, n in formats.most_common())
        raise QLoRAConfigError(
            "model",
            where,
            f"has base layers in more than one 4-bit format ({described}), so no one record describes them",
            "give each model its own recipe (qlora_recipe(...) or recipe.replace()), and load each base in one format",
        )
    return next(iter(formats), None)


def _is_lora(module: Any) -> bool:
    return hasattr(module, "lora_A") and isinstance(getattr(module, "r", None), dict) and bool(module.r)


def _rank(module: Any) -> int:
    return int(next(iter(module.r.values())))


def _strip(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX)


def _dtype_name(dtype: Any) -> str:
    return "auto" if dtype is None else str(dtype).removeprefix("torch.")
