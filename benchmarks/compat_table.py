"""One table from the compatibility matrix's result files (pinned and newest package sets, Axolotl).

    python benchmarks/compat_table.py benchmarks/results/run8-compat

Reads ``compat-*.json`` in the folder and writes ``compat.md`` there: per cell, the status and
the largest logged-loss deviation from TRL's own 4-bit path in each package set (and from TRL's
path with float32 adapters, where the run measured it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def describe(row: dict[str, Any] | None) -> str:
    """``status, deviation %`` and, where the run had one, ``(deviation % from TRL's path with float32 adapters)``."""
    if row is None:
        return "—"
    if row["status"] == "crash":
        return "crash: " + (row.get("reason") or "").splitlines()[0][:80] if row.get("reason") else "crash"
    dev = row.get("max_loss_dev_pct")
    text = row["status"] + ("" if dev is None else f", {dev:.2f} %")
    kept = row.get("fp32_adapters_dev_pct")
    return text + ("" if kept is None else f" ({kept:.2f} %)")


def main(folder: Path) -> None:
    sets: dict[str, dict[str, dict[str, Any]]] = {}
    versions: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("compat-*.json"), key=lambda p: (p.stem.count("-"), p.stem)):
        rows = json.loads(path.read_text())
        label = path.stem.removeprefix("compat-")
        sets[label] = {row["cell"]: row for row in rows}
        versions[label] = rows[0].get("versions", {}) if rows else {}
    cells = list(dict.fromkeys(cell for rows in sets.values() for cell in rows))
    labels = list(sets)
    lines = [
        "| cell | " + " | ".join(labels) + " | what the fast path leaves to the trainer |",
        "|---|" + "---|" * len(labels) + "---|",
    ]
    for cell in cells:
        rows = [sets[label].get(cell) for label in labels]
        reason = next(
            (r["reason"].splitlines()[0] for r in rows if r and r.get("reason") and r["status"] != "crash"), ""
        )
        lines.append(f"| {cell} | " + " | ".join(describe(r) for r in rows) + f" | {reason} |")
    header = [
        "Status, and the largest deviation of a logged loss from TRL's own 4-bit path over 30 steps",
        "(same seed, data and initial adapter; eval loss included where the cell evaluates). In",
        "brackets, where measured: the deviation from TRL's path with its adapters kept in float32, the",
        "one difference between the two paths (TRL 1.9 rounds a quantized model's adapters to bf16; the",
        "plugin keeps float32 master weights). A set named `-fp32` computes in float32 instead of bf16.",
        "",
    ]
    for label, found in versions.items():
        header.append(f"- {label}: " + ", ".join(f"{k} {v}" for k, v in found.items() if v))
    (folder / "compat.md").write_text("\n".join(header) + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
