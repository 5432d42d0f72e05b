"""``qlora inspect RUN``: what a run trained, read from its record, not from a recipe's intention.

A run's output directory or one of its checkpoints holds ``adapter_config.json``
(PEFT's) and ``qlora_recipe.json`` (the record of what the model trained on:
:mod:`qlora_plugin.core.run_record`). This reads both and says which base, 4-bit
format, rank and layers the adapter belongs to, and where the record came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.fields import RECIPE_FILE
from qlora_plugin.core.files import read_json

ADAPTER_CONFIG = "adapter_config.json"
FORMAT_KEYS = ("quant_type", "blocksize", "double_quant", "compute_dtype", "quant_storage")


@dataclass(frozen=True)
class RunReport:
    """A run directory's record and adapter config, as plain data."""

    path: str
    base: str | None
    record: dict[str, Any] | None
    adapter: dict[str, Any] | None

    @property
    def recorded_from(self) -> str:
        return str((self.record or {}).get("recorded_from", "recipe")) if self.record else "nothing"

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.path, "base": self.base, "recorded_from": self.recorded_from, "record": self.record}

    def lines(self) -> list[str]:
        """The report for people, one fact per line."""
        lines = [f"run {self.path}: an adapter over {self.base or '(no base named)'}"]
        if self.record is None:
            lines.append(
                "no qlora_recipe.json: the 4-bit base this adapter trained over is not recorded "
                "(`qlora merge` asks for --quant-type)"
            )
            return lines
        base = ", ".join(f"{key} {self.record[key]}" for key in FORMAT_KEYS if key in self.record)
        source = (
            "recorded from the model that trained"
            if self.recorded_from == "model"
            else "recorded from the recipe (an older record: what the run was asked to do, not read from the model)"
        )
        lines.append(f"trained on a 4-bit base: {base}; {source}")
        targets = self.record.get("target_modules")
        count = f"{len(targets)} layers" if isinstance(targets, list) else f"targets {targets!r}"
        lines.append(
            f"LoRA r={self.record.get('r')}, alpha={self.record.get('lora_alpha')}, "
            f"dropout={self.record.get('lora_dropout')} on {count}"
        )
        if isinstance(self.record.get("ranks"), dict):
            lines.append(f"ranks differ by layer: {self.record['ranks']}")
        return lines


def is_run(path: str | os.PathLike[str]) -> bool:
    """True for a directory a run wrote (an adapter or a checkpoint): a record or an adapter, no config.json."""
    directory = Path(os.path.expanduser(os.fspath(path)))
    if not directory.is_dir() or os.path.lexists(directory / "config.json"):
        return False

    return os.path.lexists(directory / RECIPE_FILE) or os.path.lexists(directory / ADAPTER_CONFIG)


def inspect_run(path: str | os.PathLike[str]) -> RunReport:
    """The :class:`RunReport` of the run directory at ``path`` (see :func:`is_run`)."""
    directory = Path(os.path.expanduser(os.fspath(path)))
    restore = "restore it from the run, or inspect the base model directory instead"
    record = adapter = None
    if os.path.lexists(directory / RECIPE_FILE):
        record = read_json(directory / RECIPE_FILE, RECIPE_FILE, restore)
    if os.path.lexists(directory / ADAPTER_CONFIG):
        adapter = read_json(directory / ADAPTER_CONFIG, ADAPTER_CONFIG, restore)
    for name, value in ((RECIPE_FILE, record), (ADAPTER_CONFIG, adapter)):
        if value is not None and not isinstance(value, dict):
            raise QLoRAConfigError(name, os.fspath(directory / name), "is not a JSON object", restore)
    base = (adapter or {}).get("base_model_name_or_path")
    return RunReport(os.fspath(path), base if isinstance(base, str) else None, record, adapter)
