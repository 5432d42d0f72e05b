"""``qlora check CONFIG``: an Axolotl config checked before any training starts.

Axolotl ignores keys it does not know, so a config with a ``qlora:`` section but
no ``plugins:`` line trains without the plugin: a 16-bit full fine-tune, or a
pydantic error about ``learning_rate``. The plugin cannot see that case (it is
not loaded), so this command does: the plugin line, the section (every field, as
the plugin reads it), the targets on a local base model, and the data
(:mod:`qlora_plugin.integrations.axolotl.data_checks`). Each problem is one line naming the key or
file, the value and the fix. Nothing here imports torch, PEFT or Axolotl.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.fields import RECIPE_FIELDS
from qlora_plugin.core.files import looks_local, path_problem, read_json, read_text
from qlora_plugin.core.model_limits import check_model_config, check_sequence_length
from qlora_plugin.core.yaml_strict import duplicate_key
from qlora_plugin.integrations.axolotl.data_checks import check_datasets
from qlora_plugin.integrations.axolotl.section import (
    PLUGIN,
    SECTION,
    check_axolotl_keys,
    in_section,
    misplaced_section,
    names_the_plugin,
    spec_from_section,
)
from qlora_plugin.tools.config_layers import report_from_config
from qlora_plugin.tools.inspection import describe_recipe


@dataclass
class Preflight:
    """The findings on one config: errors (each one line), warnings, notes, and what passed."""

    config: str
    errors: list[QLoRAConfigError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        errors = [
            {"field": e.field, "value": e.value, "problem": e.problem, "fix": e.fix, "message": str(e)}
            for e in self.errors
        ]
        return {
            "config": self.config,
            "ok": self.ok,
            "errors": errors,
            "warnings": self.warnings,
            "notes": self.notes,
            "checked": self.checked,
        }


def check_config(path: str | os.PathLike[str]) -> Preflight:
    """Check the Axolotl config at ``path`` (relative paths inside it are read from the working directory)."""
    result = Preflight(os.fspath(path))
    try:
        config = read_config(Path(path))
    except QLoRAConfigError as error:
        result.errors.append(error)
        return result
    _check_plugin_line(config, result)

    wrong_key = check_axolotl_keys(config)
    if wrong_key is not None:
        result.errors.append(wrong_key)
    spec = _check_section(config, result)
    if spec is not None:
        _check_targets(config, spec, result)

    data = check_datasets(config)
    result.errors += data.errors
    result.warnings += data.warnings
    result.notes += data.notes
    result.checked += data.checked
    return result


def read_config(path: Path) -> dict[str, Any]:
    """The YAML mapping at ``path``; one clear error when there is none."""
    import yaml

    text = read_text(path, "CONFIG", "pass the path of an Axolotl YAML config")
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise QLoRAConfigError(
            "CONFIG",
            os.fspath(path),
            f"is not valid YAML{where} ({getattr(error, 'problem', error)})",
            "fix the YAML syntax there (indentation, a missing colon or quote)",
        ) from None
    if not isinstance(config, dict):
        raise QLoRAConfigError(
            "CONFIG", os.fspath(path), "is not a mapping of Axolotl keys", "write the config as `key: value` lines"
        )

    structure = duplicate_key(text, os.fspath(path)) or misplaced_section(config)
    if structure is not None:
        raise structure
    return config


def _check_plugin_line(config: dict[str, Any], result: Preflight) -> None:
    if SECTION not in config:
        result.errors.append(
            QLoRAConfigError(
                SECTION,
                None,
                "is missing, so the plugin has nothing to do",
                f"add `{SECTION}: {{}}` (the recipe's defaults) or e.g. `{SECTION}: {{preset: paper}}`, "
                "and the plugin line",
            )
        )
    if not names_the_plugin(config.get("plugins")):
        result.errors.append(
            QLoRAConfigError(
                "plugins",
                config.get("plugins"),
                f"does not load {PLUGIN}, so Axolotl ignores the {SECTION}: section and trains without it "
                "(a 16-bit full fine-tune, or an error about learning_rate)",
                f"add the lines `plugins:` and `  - {PLUGIN}`",
            )
        )
    else:
        result.checked.append(f"plugins: loads {PLUGIN}")


def _check_section(config: dict[str, Any], result: Preflight) -> Any:
    if SECTION not in config:
        return None
    section = config[SECTION]
    try:
        spec = spec_from_section(section)
    except QLoRAConfigError as error:
        result.errors += section_problems(section, error)
        return None
    result.checked.append(f"{SECTION}: {describe_recipe(spec)}")
    return spec


def section_problems(section: Any, first: QLoRAConfigError) -> list[QLoRAConfigError]:
    """Every bad field of a ``qlora:`` section, each checked alone on the section's preset.

    The recipe stops at its first bad field; here each key is tried by itself so that one
    run names them all. ``first`` (the whole section's error) stands where no single key
    fails alone (two keys that clash, or a section that is not a mapping).
    """
    if not isinstance(section, dict):
        return [first]
    preset = {"preset": section["preset"]} if "preset" in section else {}
    problems: list[QLoRAConfigError] = []
    for key, value in section.items():
        try:
            spec_from_section({**preset, key: value})
        except QLoRAConfigError as error:
            if key != "preset" and preset and error.field == "qlora.preset":
                continue  # a bad preset is named once, under its own key
            problems.append(error)
    return problems or [first]


def _check_targets(config: dict[str, Any], spec: Any, result: Preflight) -> None:
    """Resolve the section's targets on a local base model read from its config (no weights, no torch)."""
    base = config.get("base_model")
    if base is not None and not (isinstance(base, str) and base.strip()):
        return  # reported as a wrong key
    if not base:
        result.errors.append(
            QLoRAConfigError("base_model", None, "is missing", "set base_model to a model directory or hub id")
        )
        return

    local = Path(os.path.expanduser(base))
    if not looks_local(base):
        result.notes.append(f"base_model {base} is a hub id: targets are found when the model loads")
        return
    problem = path_problem(local, "directory")
    if problem is not None:
        where = "" if local.is_absolute() else f" (relative paths are read from {os.getcwd()})"
        result.errors.append(
            QLoRAConfigError(
                "base_model",
                base,
                problem + where,
                "correct the path, or run from the directory it is relative to",
            )
        )
        return
    try:
        positions = _check_positions(local, config)
        report = report_from_config(local, spec)
    except QLoRAConfigError as error:
        result.errors.append(in_section(error) if error.field in RECIPE_FIELDS else error)
        return
    result.warnings += [positions] if positions else []
    if report is None:
        result.notes.append(f"base_model {base}: targets are found when the model loads (not a family read here)")
        return
    result.checked.append(f"base_model {base}: {report.architecture}, LoRA on {len(report.targets)} linear layers")
    result.warnings += report.warnings()


def _check_positions(model: Path, config: dict[str, Any]) -> str | None:
    """``sequence_len`` against the positions in the base's config.json: an error where they are a learned
    table, else a warning past them (returned), or None."""
    file = model / "config.json"
    if not os.path.lexists(file):
        return None  # the targets' check names a directory without a config
    model_config = read_json(file, "base_model", "restore the model's config.json")
    check_model_config(model_config, os.fspath(file))
    name = str(model_config.get("model_type", model))
    return check_sequence_length(_sequence_len(config), "sequence_len", model_config, name)


def _sequence_len(config: dict[str, Any]) -> int | None:
    value = config.get("sequence_len")
    return value if isinstance(value, int) and not isinstance(value, bool) else None
