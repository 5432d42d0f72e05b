"""A preflight over an Axolotl config's local datasets: rows, fields and lengths, one clear message each.

Axolotl reports data problems late and as tracebacks: an empty file as
``StopIteration``, a row without its answer as ``KeyError``, a cut-off JSON line
without its line number, a ``sequence_len`` shorter than every example as
``num_samples=0``, and rows with some fields missing not at all. These checks
read the JSON / JSON-lines files a config names (a hub dataset is left to
Axolotl) and say what is wrong, where, and how to fix it. ``qlora check`` runs
them, and so does the Axolotl plugin before Axolotl loads any data.

Lengths are lower bounds: the fields' tokens without the prompt template, so a
row reported as too long is too long for certain.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.files import require

MAX_ROWS = 100_000  # rows read per file; more are left to Axolotl
MAX_TOKENIZED = 2_000  # rows whose length is measured
DEFAULT_SEQUENCE_LEN = 2048  # Axolotl's default
JSON_SUFFIXES = (".json", ".jsonl")
LOCAL_PREFIXES = ("/", "./", "../", "~")
SHOWN_LINES = 5


@dataclass
class DataReport:
    """What the preflight found: errors (each one line), warnings, notes on what it left out, what it checked."""

    errors: list[QLoRAConfigError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Fields:
    """The text fields a dataset type reads: required ones, then optional ones."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()


def check_datasets(cfg: Mapping[str, Any]) -> DataReport:
    """Check every local dataset of ``cfg`` (an Axolotl config as a mapping).

    Paths are relative to the working directory, as Axolotl reads them.
    """
    report = DataReport()
    entries = cfg.get("datasets") or []
    if not isinstance(entries, list) or not entries:
        report.errors.append(
            QLoRAConfigError(
                "datasets",
                entries or None,
                "names no dataset",
                "add e.g. `datasets: [{path: ./train.jsonl, type: alpaca}]`",
            )
        )
        return report
    sequence_len = cfg.get("sequence_len")
    if isinstance(sequence_len, bool) or not isinstance(sequence_len, int) or sequence_len < 1:
        sequence_len = DEFAULT_SEQUENCE_LEN  # a wrong one is reported with the config's keys
    tokenizer = load_tokenizer(_text(cfg.get("tokenizer_config")) or _text(cfg.get("base_model")))
    if tokenizer is None:
        report.notes.append("lengths not checked: no local tokenizer.json with the base model")
    for index, entry in enumerate(entries):
        try:
            _check_entry(index, entry, sequence_len, tokenizer, report)
        except QLoRAConfigError as error:
            report.errors.append(error)
    return report


def _check_entry(index: int, entry: Any, sequence_len: int, tokenizer: Any, report: DataReport) -> None:
    name = f"datasets[{index}]"
    if not isinstance(entry, Mapping) or not entry.get("path"):
        raise QLoRAConfigError(
            f"{name}.path",
            None if not isinstance(entry, Mapping) else entry.get("path"),
            "is missing",
            "give each dataset a path, e.g. `- path: ./train.jsonl`",
        )
    if not isinstance(entry["path"], str):
        raise QLoRAConfigError(
            f"{name}.path",
            entry["path"],
            f"must be a file path or a hub dataset name, not {type(entry['path']).__name__}",
            "write the path as text, e.g. `- path: ./train.jsonl`",
        )
    path = Path(os.path.expanduser(entry["path"]))
    if os.path.lexists(path) and path.is_dir():
        require(path, "directory", f"{name}.path", "make the directory readable, or point the dataset elsewhere")
    if not path.exists():
        if str(entry["path"]).startswith(LOCAL_PREFIXES) or path.suffix in JSON_SUFFIXES:
            raise QLoRAConfigError(
                f"{name}.path",
                str(entry["path"]),
                f"no such file (relative paths are read from {os.getcwd()}, where axolotl runs)",
                "correct the path, or run from the directory it is relative to",
            )
        report.notes.append(f"{name}: {entry['path']} is a hub dataset; not checked here")
        return
    files = sorted(p for p in path.iterdir() if p.suffix in JSON_SUFFIXES) if path.is_dir() else [path]
    if not files or not (all(f.suffix in JSON_SUFFIXES for f in files) or entry.get("ds_type") == "json"):
        report.notes.append(f"{name}: {entry['path']} is not JSON or JSON lines; not checked here")
        return
    wanted = fields_of(entry)
    for file in files:
        rows = list(read_rows(file, f"{name}.path"))
        if wanted is not None:
            _check_fields(name, file, rows, wanted)
        summary = f"{name} {file.name}: {len(rows)} rows"
        if wanted is not None:
            summary += f" with {', '.join(wanted.required)}"
        if tokenizer is not None and wanted is not None:
            summary += _check_lengths(name, file, rows, wanted, sequence_len, tokenizer, report)
        report.checked.append(summary)


def fields_of(entry: Mapping[str, Any]) -> Fields | None:
    """The fields the dataset's ``type`` reads, or None for a type these checks do not know."""
    kind = entry.get("type")
    if isinstance(kind, Mapping):  # a user-defined prompt format
        return Fields(
            (kind.get("field_instruction") or "instruction", kind.get("field_output") or "output"),
            (kind.get("field_input") or "input",),
        )
    if kind == "alpaca":
        return Fields(("instruction", "output"), ("input",))
    if kind == "completion":
        return Fields((entry.get("field") or "text",))
    if kind == "chat_template":
        return Fields((entry.get("field_messages") or "messages",))
    return None


def read_rows(file: Path, field: str = "path") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each row of a JSON-lines file or a JSON array; one clear error for a bad file.

    ``field`` names the config key that points at the file, for the error of an empty one.
    """
    require(file, "file", field, "make the file readable, or point the dataset at a readable one")
    try:
        text = file.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise QLoRAConfigError(
            field, os.fspath(file), f"cannot be read ({error.strerror or error})", "point it at a readable file"
        ) from None
    if not text.strip() or text.strip() == "[]":
        raise QLoRAConfigError(
            field,
            os.fspath(file),
            "is an empty file (no rows), so there is nothing to train on",
            "point it at the training file, one JSON object per line",
        )
    if text.lstrip().startswith("["):
        yield from _array_rows(file, text)
        return
    count = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise QLoRAConfigError(
                f"{file} line {number}",
                _clip(line),
                f"is not valid JSON ({error.msg})",
                f"repair or delete line {number} (cut off while the file was written?)",
            ) from None
        if not isinstance(row, dict):
            raise QLoRAConfigError(
                f"{file} line {number}",
                _clip(line),
                "is not a JSON object",
                'write each row as an object, e.g. {"instruction": ..., "output": ...}',
            )
        count += 1
        yield number, row
        if count >= MAX_ROWS:
            return


def _array_rows(file: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise QLoRAConfigError(
            f"{file} line {error.lineno}",
            _clip(text.splitlines()[error.lineno - 1]),
            f"is not valid JSON ({error.msg})",
            f"repair the file at line {error.lineno}",
        ) from None
    for number, row in enumerate(rows[:MAX_ROWS], start=1):
        if not isinstance(row, dict):
            raise QLoRAConfigError(
                f"{file} item {number}", _clip(json.dumps(row)), "is not a JSON object", "write each row as an object"
            )
        yield number, row


def _check_fields(name: str, file: Path, rows: list[tuple[int, dict[str, Any]]], wanted: Fields) -> None:
    for key in wanted.required:
        lacking = [number for number, row in rows if not _has_text(row.get(key))]
        if not lacking:
            continue
        where = ", ".join(str(n) for n in lacking[:SHOWN_LINES]) + (", ..." if len(lacking) > SHOWN_LINES else "")
        share = (
            "no row has it"
            if len(lacking) == len(rows)
            else f"{len(lacking)} of {len(rows)} rows lack it or leave it empty"
        )
        present = sorted({k for _, row in rows[:50] for k in row})
        raise QLoRAConfigError(
            f"{name} {file.name}",
            key,
            f"is a field the dataset type needs, and {share} (lines {where})",
            f"fill in {key!r} on those lines or remove them, or map the type to the fields the file has: {present}",
        )


def _has_text(value: Any) -> bool:
    """A usable field: non-blank text, or a non-empty list (chat messages)."""
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, list) and bool(value)


def _check_lengths(
    name: str,
    file: Path,
    rows: list[tuple[int, dict[str, Any]]],
    wanted: Fields,
    sequence_len: int,
    tokenizer: Any,
    report: DataReport,
) -> str:
    sample = rows[:MAX_TOKENIZED]
    texts = [" ".join(_text(row.get(key)) for key in (*wanted.required, *wanted.optional)) for _, row in sample]
    lengths = [len(encoding.ids) for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]
    too_long = sum(length > sequence_len for length in lengths)
    if lengths and too_long == len(lengths):
        shortest = min(lengths)
        raise QLoRAConfigError(
            "sequence_len",
            sequence_len,
            f"is shorter than every row of {name} {file.name} checked ({len(lengths)}; the shortest has at least "
            f"{shortest} tokens before the prompt template), so Axolotl would drop them all",
            f"raise sequence_len to well above {shortest}, e.g. sequence_len: {_round_up(shortest * 2)}",
        )
    if too_long:
        report.warnings.append(
            f"{name} {file.name}: {too_long} of {len(lengths)} rows checked are longer than "
            f"sequence_len={sequence_len} and will be dropped"
        )
    return f", the longest at least {max(lengths)} tokens (sequence_len {sequence_len})" if lengths else ""


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value) if value is not None else ""


def _round_up(tokens: int, step: int = 64) -> int:
    return max(step, -(-tokens // step) * step)


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def load_tokenizer(model: Any) -> Any:
    """The ``tokenizers`` tokenizer of a local model directory (no transformers import), or None."""
    if not model:
        return None
    file = Path(os.path.expanduser(str(model))) / "tokenizer.json"
    if not file.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file))
    except Exception:  # noqa: BLE001 - tokenizers raises plain Exceptions; an unreadable file is Axolotl's to report
        return None
