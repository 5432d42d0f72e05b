"""Which 4-bit base an adapter was trained against, from the records its run left.

An adapter is merged into the base as training saw it: quantized with the same
data type (NF4 or FP4) and double quantization, then dequantized. Merging an FP4
run as NF4 gives a different model, silently, so the format is read from the
run's records and never guessed:

- ``qlora_recipe.json`` (written by the recipe and by the Axolotl plugin),
- ``qlora_expanded.yml`` (the Axolotl plugin's expanded config),
- ``config.json`` with a ``quantization_config`` (written by the trainer),

each looked for in the adapter's directory, and for a ``checkpoint-N`` also in
the run's output directory above it. Records that disagree, or
no record at all, are an error unless the caller says which format to use.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.fields import RECIPE_FIELDS, RECIPE_FILE, RecipeSpec
from qlora_plugin.core.files import read_json, read_text

EXPANDED_CONFIG = "qlora_expanded.yml"
MODEL_CONFIG = "config.json"
DEFAULT_FORMAT = ("nf4", True)
CHECKPOINT_NAME = re.compile(r"checkpoint-\d+")


@dataclass(frozen=True)
class Record:
    """One file's statement of the 4-bit format."""

    file: Path
    quant_type: str
    double_quant: bool
    fields: dict[str, Any] | None = None  # the whole recipe, where the file is a qlora_recipe.json

    def describe(self) -> str:
        return f"{self.file} says {self.quant_type}, double quant {self.double_quant}"


@dataclass(frozen=True)
class TrainedFormat:
    """The format to merge with, where it came from, and any note for the user."""

    quant_type: str
    double_quant: bool
    source: str
    recipe_fields: dict[str, Any] | None = None
    note: str | None = None


def trained_format(
    adapter_dir: str | os.PathLike[str],
    adapter_config: dict[str, Any],
    *,
    quant_type: str | None = None,
    double_quant: bool | None = None,
    assume_default: bool = False,
) -> TrainedFormat:
    """The 4-bit format to merge the adapter at ``adapter_dir`` with (see the module docstring for the rules)."""
    records = find_records(Path(adapter_dir), adapter_config)
    recipe_fields = next((r.fields for r in records if r.fields is not None), None)
    if quant_type is not None or double_quant is not None:
        chosen = (
            quant_type or (records[0].quant_type if records else DEFAULT_FORMAT[0]),
            double_quant if double_quant is not None else (records[0].double_quant if records else DEFAULT_FORMAT[1]),
        )
        overruled = [r.describe() for r in records if (r.quant_type, r.double_quant) != chosen]
        note = f"the command line overrules: {'; '.join(overruled)}" if overruled else None
        return TrainedFormat(*chosen, source="the command line", recipe_fields=recipe_fields, note=note)
    untrained = not_4bit_record(Path(adapter_dir), records)
    if untrained is not None:
        file, says = untrained
        raise QLoRAConfigError(
            os.fspath(file),
            says,
            "says the run trained on a base that was not 4-bit; this merges QLoRA adapters into the 4-bit base "
            "dequantized, which would give a different model",
            "merge it on the base it was trained on (PeftModel.from_pretrained(base, ADAPTER).merge_and_unload(), "
            "then save_pretrained) and export that folder; or pass --quant-type if training was 4-bit after all",
        )
    formats = {(r.quant_type, r.double_quant) for r in records}
    if len(formats) > 1:
        raise QLoRAConfigError(
            "ADAPTER_DIR",
            os.fspath(adapter_dir),
            "has records that disagree on the 4-bit format it was trained against: "
            + "; ".join(r.describe() for r in records),
            "pass the format training used: --quant-type nf4|fp4 and --double-quant or --no-double-quant",
        )
    if records:
        first = records[0]
        return TrainedFormat(
            first.quant_type, first.double_quant, source=os.fspath(first.file), recipe_fields=recipe_fields
        )
    if assume_default:
        return TrainedFormat(*DEFAULT_FORMAT, source="--assume-default-recipe")
    raise QLoRAConfigError(
        "ADAPTER_DIR",
        os.fspath(adapter_dir),
        "holds no record of the 4-bit base it was trained against (no qlora_recipe.json, qlora_expanded.yml or "
        "config.json quantization_config; for a checkpoint-N, none in its run's directory either), and merging "
        "with the wrong one gives a different model",
        "pass --quant-type nf4|fp4 (and --no-double-quant if training had it off), or --assume-default-recipe "
        "for the recipe's default, NF4 with double quant",
    )


def find_records(adapter_dir: Path, adapter_config: dict[str, Any]) -> list[Record]:
    """Every record of the format in ``adapter_dir`` and its parent, the adapter's own directory first."""
    records: list[Record] = []
    directories = [adapter_dir]
    if CHECKPOINT_NAME.fullmatch(adapter_dir.resolve().name):
        directories.append(adapter_dir.resolve().parent)
    for directory in directories:
        readers = ((RECIPE_FILE, _from_recipe), (EXPANDED_CONFIG, _from_expanded), (MODEL_CONFIG, _from_model_config))
        for name, reader in readers:
            file = directory / name
            if os.path.lexists(file):
                record = reader(file, adapter_config)
                if record is not None:
                    records.append(record)
        if records:
            break  # the checkpoint's own records speak for it; the run's only when it has none
    return records


def not_4bit_record(adapter_dir: Path, records: list[Record]) -> tuple[Path, str] | None:
    """A run record beside the adapter that says its base was not 4-bit (8-bit, another method, or 16-bit)."""
    directories = [adapter_dir]
    if CHECKPOINT_NAME.fullmatch(adapter_dir.resolve().name):
        directories.append(adapter_dir.resolve().parent)
    for directory in directories:
        expanded = directory / EXPANDED_CONFIG
        if expanded.is_file():
            import yaml

            try:
                data = yaml.safe_load(expanded.read_text(encoding="utf-8"))
            except yaml.YAMLError:
                data = None
            if isinstance(data, dict) and (data.get("load_in_8bit") or data.get("adapter") == "lora"):
                key = "load_in_8bit" if data.get("load_in_8bit") else "adapter"
                return expanded, f"{key}: {data[key]}"
        config = directory / MODEL_CONFIG
        if config.is_file():
            data = _read_json(config)
            quantization = data.get("quantization_config") if isinstance(data, dict) else None
            if isinstance(quantization, dict) and not quantization.get("load_in_4bit"):
                method = quantization.get("quant_method", "?")
                return config, "load_in_8bit" if quantization.get("load_in_8bit") else f"quant_method {method}"
            if isinstance(data, dict) and quantization is None and not records:
                return config, "no quantization_config"
    return None


def _from_recipe(file: Path, adapter_config: dict[str, Any]) -> Record | None:
    data = _read_json(file)
    if not isinstance(data, dict) or "quant_type" not in data:
        raise QLoRAConfigError(
            os.fspath(file),
            None,
            "is not a recipe file (no quant_type)",
            "restore it from the run, or delete it and pass --quant-type",
        )
    for key, adapter_key in (("r", "r"), ("lora_alpha", "lora_alpha")):
        if key in data and adapter_key in adapter_config and data[key] != adapter_config[adapter_key]:
            raise QLoRAConfigError(
                os.fspath(file),
                f"{key}={data[key]}",
                "does not describe this adapter "
                f"(its adapter_config.json has {adapter_key}={adapter_config[adapter_key]})",
                "merge with the recipe file of the run that trained this adapter, or pass --quant-type",
            )

    try:
        RecipeSpec(**{key: value for key, value in data.items() if key in RECIPE_FIELDS})
    except QLoRAConfigError as error:
        raise QLoRAConfigError(
            f"{file}: {error.field}",
            error.value,
            error.problem,
            "restore the file from the run, or delete it and pass --quant-type",
        ) from None
    return Record(file, data["quant_type"], bool(data.get("double_quant", True)), fields=data)


def _from_expanded(file: Path, adapter_config: dict[str, Any]) -> Record | None:
    import yaml

    text = read_text(file, file.name, "restore the file from the run, or delete it and pass --quant-type")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    kwargs = (data or {}).get("bnb_config_kwargs") if isinstance(data, dict) else None
    if not isinstance(kwargs, dict) or "bnb_4bit_quant_type" not in kwargs:
        return None
    return Record(file, kwargs["bnb_4bit_quant_type"], bool(kwargs.get("bnb_4bit_use_double_quant", False)))


def _from_model_config(file: Path, adapter_config: dict[str, Any]) -> Record | None:
    data = _read_json(file)
    quantization = data.get("quantization_config") if isinstance(data, dict) else None
    if not isinstance(quantization, dict) or not quantization.get("load_in_4bit"):
        return None
    return Record(
        file, quantization.get("bnb_4bit_quant_type", "fp4"), bool(quantization.get("bnb_4bit_use_double_quant", False))
    )


def _read_json(file: Path) -> Any:
    return read_json(file, file.name, "restore the file from the run, or delete it and pass --quant-type")
