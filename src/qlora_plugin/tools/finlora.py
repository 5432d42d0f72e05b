"""``qlora convert-finlora``: one FinLoRA ``finetune_configs.json`` entry as an Axolotl YAML.

FinLoRA (github.com/wangd12rpi/FinLoRA, ``lora/finetune_configs.json``) names each
run and gives its base model, dataset, LoRA rank, quantization bits and trainer
settings. The YAML written here runs the same settings through this package's
Axolotl plugin: a ``qlora:`` section carries the recipe fields (rank, learning
rate, epochs, batch, accumulation), the plugin expands it into Axolotl's keys.

Only 4-bit entries are QLoRA; 8- and 16-bit entries are refused unless the
caller asks for them to be converted as 4-bit runs.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from qlora_plugin.core.errors import QLoRAConfigError, nearest
from qlora_plugin.core.fields import recipe_spec
from qlora_plugin.core.files import read_json, require
from qlora_plugin.core.safe_io import check_writable_destination, write_text_atomically
from qlora_plugin.integrations.axolotl.section import PLUGIN

REQUIRED = (
    "base_model",
    "dataset_path",
    "lora_r",
    "quant_bits",
    "learning_rate",
    "num_epochs",
    "batch_size",
    "gradient_accumulation_steps",
)
# FinLoRA key -> recipe field of the qlora: section.
RECIPE_KEYS = {
    "lora_r": "r",
    "learning_rate": "learning_rate",
    "num_epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "peft_use_dora": "use_dora",
}
OTHER_KEYS = {"base_model", "dataset_path", "quant_bits"}
# FinLoRA's training files are JSON lines with a `context` (the prompt) and a `target` (the answer).
FINLORA_DATASET_TYPE = {
    "field_instruction": "context",
    "field_output": "target",
    "format": "{instruction}",
    "no_input_format": "{instruction}",
}


def read_entry(configs: str | os.PathLike[str], name: str) -> dict[str, Any]:
    """The entry ``name`` of a FinLoRA-style configs file, checked for the keys a run needs."""
    path = require(configs, "file", "CONFIGS_JSON", "pass the path of FinLoRA's lora/finetune_configs.json")
    entries = read_json(path, "CONFIGS_JSON", "fix the file; it maps run names to their settings")
    if not isinstance(entries, dict):
        raise QLoRAConfigError(
            "CONFIGS_JSON",
            os.fspath(path),
            "is not a mapping of run names to settings",
            "pass FinLoRA's finetune_configs.json or a file of the same shape",
        )
    if name not in entries:
        names = sorted(entries)
        raise QLoRAConfigError(
            "NAME", name, "is not an entry of the file" + nearest(name, names), f"use one of {names}"
        )
    entry = entries[name]
    if not isinstance(entry, dict):
        raise QLoRAConfigError(name, entry, "is not a mapping of settings", "give the entry its settings as keys")
    missing = [key for key in REQUIRED if key not in entry]
    if missing:
        raise QLoRAConfigError(
            f"{name}.{missing[0]}",
            None,
            f"is missing (the entry lacks {missing})",
            f"add {missing} to the entry; every entry needs {list(REQUIRED)}",
        )
    return entry


def quant_bits(entry: dict[str, Any], name: str, force_4bit: bool) -> list[str]:
    """Check ``quant_bits``; return notes for a mapped entry."""
    bits = entry["quant_bits"]
    if bits == 4:
        return []
    if bits in (8, 16) and not isinstance(bits, bool):
        if force_4bit:
            return [f"{name} asks for {bits}-bit; converted as a 4-bit QLoRA run (NF4, double quant)"]
        raise QLoRAConfigError(
            f"{name}.quant_bits",
            bits,
            f"is a {'8-bit LoRA' if bits == 8 else '16-bit LoRA'} run, not QLoRA",
            "pick a 4-bit entry, or pass --force-4bit to convert it as a 4-bit run",
        )
    raise QLoRAConfigError(
        f"{name}.quant_bits", bits, "is not a bit width FinLoRA uses", "set quant_bits to 4 (or 8/16 with --force-4bit)"
    )


def axolotl_config(
    entry: dict[str, Any],
    name: str,
    *,
    preset: str | None = None,
    base_model: str | None = None,
    dataset_type: str = "finlora",
    sequence_len: int = 4096,
    force_4bit: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """The Axolotl config for ``entry`` and notes on what was mapped or ignored.

    Every value written is checked first: the recipe fields by the recipe's rules (and written
    as the numbers they mean), the model and dataset as non-empty text, the options as the
    command line gives them; ``name`` only goes into a path as a plain file name.
    """
    notes = quant_bits(entry, name, force_4bit)
    for option, value in (("--preset", preset), ("--base-model", base_model), ("--dataset-type", dataset_type)):
        if value is not None and not value.strip():
            raise QLoRAConfigError(option, value, "is empty", f"give {option} a value, or leave the option out")
    section: dict[str, Any] = {"preset": preset} if preset else {}
    for key, field in RECIPE_KEYS.items():
        if key in entry and not (key == "peft_use_dora" and entry[key] is False):
            section[field] = entry[key]
    try:
        spec = recipe_spec(preset or "default", **{k: v for k, v in section.items() if k != "preset"})
    except QLoRAConfigError as error:
        finlora_key = {v: k for k, v in RECIPE_KEYS.items()}.get(error.field, error.field)
        raise QLoRAConfigError(f"{name}.{finlora_key}", error.value, error.problem, error.fix) from error
    checked = spec.recipe_fields()
    section = {field: checked[field] if field != "preset" else value for field, value in section.items()}
    ignored = sorted(set(entry) - set(RECIPE_KEYS) - OTHER_KEYS, key=str)
    if ignored:
        notes.append(f"keys with no QLoRA meaning here, left out: {ignored}")
    if sequence_len < 1:
        raise QLoRAConfigError("--sequence-len", sequence_len, "must be at least 1", "pass e.g. --sequence-len 4096")
    model = base_model or _text(entry, name, "base_model", "pass --base-model PATH, or set base_model in the entry")
    data = _text(entry, name, "dataset_path", "set dataset_path to the training file, e.g. ./data/train.jsonl")
    folder = file_name(name)
    if folder != name:
        notes.append(f"output_dir uses {folder!r}: the entry's name is not a plain file name")
    dataset = FINLORA_DATASET_TYPE if dataset_type == "finlora" else dataset_type
    config = {
        "base_model": model,
        "plugins": [PLUGIN],
        "qlora": section,
        "datasets": [{"path": data, "type": dataset}],
        "sequence_len": sequence_len,
        "output_dir": f"./outputs/{folder}",
    }
    return config, notes


def _text(entry: dict[str, Any], name: str, key: str, fix: str) -> str:
    """The entry's ``key`` as non-empty text (a path or hub id), or one clear error."""
    value = entry[key]
    if not isinstance(value, str) or not value.strip():
        kind = "empty" if isinstance(value, str) else f"{type(value).__name__}, not a path or hub id"
        raise QLoRAConfigError(f"{name}.{key}", value, f"is {kind}", fix)
    return value.strip()


def file_name(name: str) -> str:
    """``name`` as one plain path component (letters, digits, ``._-``), for the paths built from it."""
    plain = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    return plain if plain else "run"


def write_atomically(path: Path, text: str, force: bool) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it; refuse to overwrite without ``force``."""
    check_writable_destination(path, "--out")
    if path.is_dir():
        raise QLoRAConfigError("--out", os.fspath(path), "is a directory", "name the YAML file to write")
    if path.exists() and not force:
        raise QLoRAConfigError("--out", os.fspath(path), "already exists", "choose another path, or pass --force")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, text)


def convert(
    configs: str | os.PathLike[str],
    name: str,
    out: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    **options: Any,
) -> tuple[Path, dict[str, Any], list[str]]:
    """Convert entry ``name`` of ``configs`` and write the YAML; returns (path, config, notes)."""
    import yaml

    entry = read_entry(configs, name)
    config, notes = axolotl_config(entry, name, **options)
    if out is not None and not os.fspath(out).strip():
        raise QLoRAConfigError("--out", out, "is empty", "name the YAML file to write, or leave --out out")
    target = Path(out) if out else Path("configs") / f"{file_name(name)}.yml"
    source = json.dumps(os.path.basename(os.fspath(configs)))  # quoted and escaped: a comment stays one line
    header = (
        f"# Converted by `qlora convert-finlora` from {source}, entry {json.dumps(name)}.\n"
        "# dataset paths are as FinLoRA gives them: relative to the directory axolotl runs in.\n"
    )
    write_atomically(target, header + yaml.safe_dump(config, sort_keys=False), force)
    return target, config, notes
