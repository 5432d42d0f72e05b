"""Result files: rows appended to a JSON list, and the markdown table rendered from such lists."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench_config import VARIANTS


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Add ``row`` to the JSON list in ``path`` (created if missing), so processes can share one file."""
    rows = json.loads(path.read_text()) if path.exists() else []
    rows.append(row)
    path.write_text(json.dumps(rows, indent=1))


SUMMARY = ("shape", "variant", "tok_s", "peak_gib", "loss_first", "loss_last", "optimizer_pct", "cuda_graphs")


def record_row(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` to ``path`` and print its headline fields as one JSON line (what the driver reads)."""
    append_row(path, row)
    print(json.dumps({key: row[key] for key in SUMMARY}), flush=True)


COLUMNS = (
    "shape",
    "variant",
    "tok_s",
    "step_s",
    "peak_gib",
    "grad_ckpt",
    "optimizer",
    "optimizer_pct",
    "lora_dropout",
    "adapter_dtype",
    "loss_first",
    "loss_last",
)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """``rows`` as a markdown table of ``COLUMNS``, by shape then variant order."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    order = {v: i for i, v in enumerate(VARIANTS)}
    for r in sorted(rows, key=lambda r: (r.get("shape", ""), order.get(r.get("variant"), 99), r.get("variant", ""))):
        cells = []
        for c in COLUMNS:
            v = r.get(c, "")
            cells.append(f"{v:,}" if c == "tok_s" and isinstance(v, int) else str(v if v is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cmd_table(a: argparse.Namespace) -> None:
    """Print the markdown table of every row in the given JSON files."""
    rows = [r for f in a.files for r in json.loads(Path(f).read_text())]
    print(markdown_table(rows))
