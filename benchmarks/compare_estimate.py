"""Compare ``qlora estimate`` with measured peaks; exit 1 if any case is off by more than 15 %.

Input: JSON files, each either a list of measurement rows::

    {"model": "llama-3.2-1b" | "llama-3.1-8b", "path": "stock" | "fast",
     "recompute": "none" | "full" | "offload", "fused_loss": bool, "seq": int, "batch": int,
     "peak_allocated_bytes": int, "paged_state_bytes": int (optional)}

(optional keys, with the defaults of ``qlora estimate``: ``kernels``, ``adapter_dtype``,
``cached_constants``, ``lora_dropout`` (0.05), ``r`` (16), ``label``), or the report
``measure_memory.py`` writes (``{"runs": [...]}``), which is converted to rows first.

``peak_allocated_bytes`` is ``torch.cuda.max_memory_allocated`` over the step; it is
compared with the estimate's allocator peak (paged optimizer states live outside
PyTorch's allocator and are compared on their own where a row has them).

Run: ``python benchmarks/compare_estimate.py results/memory_peaks_h100.json --out results/``
writes ``estimate_vs_measured.json`` and ``.md`` there (``--name`` changes the stem).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TOLERANCE = 0.15
GIB = 1024**3
REQUIRED = ("model", "path", "recompute", "fused_loss", "seq", "batch", "peak_allocated_bytes")


def rows_from_measure_memory(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows from ``measure_memory.py``'s report: its fast path is the recipe's without kernels
    (bf16 adapters, transformers' loss, HF gradient checkpointing), dropout 0.05, r 16."""
    rows = []
    for run in report["runs"]:
        fast = run["path"] == "fast"
        for case in run.get("cases", []):
            if "peak_allocated" not in case:
                continue
            rows.append(
                {
                    "model": run["model"],
                    "path": run["path"],
                    "recompute": "full" if run["gradient_checkpointing"] else "none",
                    "fused_loss": False,
                    "kernels": False,
                    "adapter_dtype": "bfloat16" if fast else "float32",
                    "lora_dropout": 0.05,
                    "r": 16,
                    "seq": case["seq"],
                    "batch": case["batch"],
                    "peak_allocated_bytes": case["peak_allocated"],
                    "paged_state_bytes": case.get("paged_state_bytes"),
                    "label": "measure_memory.py (bare training loop)",
                }
            )
    return rows


def read_rows(path: str) -> list[dict[str, Any]]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    rows = rows_from_measure_memory(data) if isinstance(data, dict) and "runs" in data else data
    if not isinstance(rows, list):
        raise SystemExit(f"{path}: expected a JSON list of measurement rows or measure_memory.py's report")
    for index, row in enumerate(rows):
        missing = [key for key in REQUIRED if key not in row]
        if missing:
            raise SystemExit(f"{path}: row {index} lacks {missing}; each row needs {list(REQUIRED)}")
    return rows


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with the estimate and the relative error of the allocator peak."""
    import torch
    from llama_shapes import llama_config
    from transformers import AutoModelForCausalLM

    from qlora_plugin.core.recipe import qlora_recipe
    from qlora_plugin.tools.estimate import estimate_memory, training_path
    from qlora_plugin.tools.inspection import analyze

    models: dict[str, Any] = {}
    results = []
    for row in rows:
        if row["model"] not in models:
            with torch.device("meta"):
                models[row["model"]] = AutoModelForCausalLM.from_config(llama_config(row["model"]))
        recipe = qlora_recipe(r=row.get("r", 16), lora_dropout=row.get("lora_dropout", 0.05))
        path = training_path(
            recipe,
            row["path"],
            recompute=row["recompute"],
            fused_loss=row["fused_loss"],
            kernels=row.get("kernels"),
            adapter_dtype=row.get("adapter_dtype"),
            cached_constants=row.get("cached_constants"),
        )
        result = estimate_memory(analyze(models[row["model"]], recipe), row["seq"], row["batch"], path)
        measured = row["peak_allocated_bytes"]
        paged = row.get("paged_state_bytes")
        results.append(
            row
            | {
                "path_model": path.describe(),
                "estimated_peak_allocated_bytes": result.allocator_peak,
                "error_pct": round(100 * (result.allocator_peak - measured) / measured, 2),
                "estimated_paged_state_bytes": result.paged_optimizer,
                "paged_error_pct": round(100 * (result.paged_optimizer - paged) / paged, 2) if paged else None,
                "peak_moment": result.peak_moment,
            }
        )
    return results


def markdown(results: list[dict[str, Any]], sources: list[str]) -> str:
    lines = [
        "# `qlora estimate` against measured peaks",
        "",
        f"Sources: {', '.join(sources)}. Peak = `torch.cuda.max_memory_allocated` (paged optimizer "
        f"states are outside it). Tolerance: {TOLERANCE:.0%} on every case.",
        "",
        "| model | path | recompute | fused loss | kernels | adapters | seq | batch | estimate GiB | measured GiB "
        "| error % | paged est/meas MiB |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        paged = r.get("paged_state_bytes")
        paged_text = f"{r['estimated_paged_state_bytes'] / 2**20:.0f} / {paged / 2**20:.0f}" if paged else "-"
        flag = "" if abs(r["error_pct"]) <= 100 * TOLERANCE else " **(over)**"
        lines.append(
            f"| {r['model']} | {r['path']} | {r['recompute']} | {r['fused_loss']} | {r.get('kernels', '-')} "
            f"| {r.get('adapter_dtype', '-')} | {r['seq']} | {r['batch']} "
            f"| {r['estimated_peak_allocated_bytes'] / GIB:.2f} | {r['peak_allocated_bytes'] / GIB:.2f} "
            f"| {r['error_pct']:+.1f}{flag} | {paged_text} |"
        )
    worst = max(results, key=lambda r: abs(r["error_pct"]))
    lines += [
        "",
        f"{len(results)} cases; largest error {worst['error_pct']:+.1f} % "
        f"({worst['model']}, {worst['path']}, recompute {worst['recompute']}, {worst['seq']} x {worst['batch']}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measured", nargs="+", help="measurement JSON files (rows, or measure_memory.py reports)")
    parser.add_argument("--out", required=True, help="directory for the JSON and markdown results")
    parser.add_argument("--name", default="estimate_vs_measured", help="file stem of the results")
    args = parser.parse_args(argv)

    rows = [row for path in args.measured for row in read_rows(path)]
    if not rows:
        raise SystemExit("no measurement rows found")
    results = compare(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sources = [os.path.basename(path) for path in args.measured]
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    table = markdown(results, sources)
    (out / f"{args.name}.md").write_text(table, encoding="utf-8")
    print(table)
    over = [r for r in results if abs(r["error_pct"]) > 100 * TOLERANCE]
    if over:
        print(f"{len(over)} case(s) off by more than {TOLERANCE:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
