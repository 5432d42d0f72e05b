#!/usr/bin/env python3
"""70B on one GPU (issue 22 item 6): tok/s at 4,096 tokens and the longest row that trains, in one call.

    python benchmarks/one_gpu_70b.py --out DIR [--shape llama-3.1-70b] [--rows full:4096 offload:4096
        offload:65536 offload:98304] [--deadline 560]

Each row is one ``multigpu_job.py --build-in-place`` process on one GPU (the model built straight
into 4 bits, layer by layer: about 4 s at 70B), batch 1, the recipe with ``--recompute`` as the
row names it, ``SFTTrainer`` as a user runs it. Rows go in the order given; a row starts only if
the time left is at least what the previous long row of its recompute mode took, scaled by the
square of the length ratio (attention's share grows so), or a minute when there is none. Short
rows run 4 steps, timing the last 3; rows of 32,768 tokens or more run one timed step. Every row
gets ``qlora estimate``'s allocator peak for the same recipe and length, so the report says whether
the estimate is within 15 % (item 6). Results:
``one_gpu_70b.json`` (the rows) and ``one_gpu_70b.md`` (a table) in ``--out``, written after each
row, so a call cut short keeps what finished. Run it through ``one_gpu_70b.sh`` on the device.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LONG = 32768  # rows from here on run one timed step
DEFAULT_ROWS = ("full:4096", "offload:4096", "offload:65536", "offload:98304")


def parse_row(text: str) -> tuple[str, int]:
    """``mode:seq`` -> (recompute mode, sequence length); a one-line error names what is wrong."""
    from multigpu_job import RECOMPUTE

    mode, _, seq = text.partition(":")
    if mode not in RECOMPUTE or not seq.isdigit() or int(seq) < 16:
        raise argparse.ArgumentTypeError(
            f"row {text!r}: write MODE:SEQ with MODE one of {sorted(RECOMPUTE)} and SEQ a length of at least 16"
        )
    return mode, int(seq)


def estimate_gib(config_dir: Path, mode: str, seq: int) -> float | None:
    """``qlora estimate``'s allocator peak (GiB) for the job's recipe at ``seq`` tokens, batch 1."""
    try:
        from multigpu_job import job_recipe

        from qlora_plugin.fastpath.stash_plan import host_memory
        from qlora_plugin.tools.estimate import GIB, estimate, training_path

        recipe = job_recipe("auto", None, mode)
        # this host's room, as the row's split saw it (inputs the host cannot pin stay on the GPU)
        path = training_path(recipe, host_available=host_memory()[0] if mode == "offload" else None)
        return round(estimate(config_dir, recipe, seq, 1, path).allocator_peak / GIB, 2)
    except Exception as error:  # the row keeps its measurements
        print(f"estimate failed for {mode}:{seq}: {type(error).__name__}: {error}", flush=True)
        return None


def run_row(shape: str, mode: str, seq: int, out: Path, limit: float) -> dict[str, Any]:
    """One ``multigpu_job.py`` process; its row, or ``error`` with the last lines of its log."""
    steps, warmup = (1, 0) if seq >= LONG else (4, 1)
    name = f"{mode}-{seq}"
    row_path, log_path = out / f"{name}.json", out / f"{name}.log"
    command = [
        sys.executable,
        str(HERE / "multigpu_job.py"),
        "--build-in-place",
        "--shape",
        shape,
        "--batch",
        "1",
        "--seq",
        str(seq),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--recompute",
        mode,
        "--out",
        str(row_path),
    ]
    started = time.perf_counter()
    with log_path.open("w") as log:
        try:
            code: int | None = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            code = None
    row: dict[str, Any] = {
        "shape": shape,
        "recompute": mode,
        "seq": seq,
        "wall_s": round(time.perf_counter() - started),
    }
    if code == 0 and row_path.exists():
        measured = json.loads(row_path.read_text())
        peak = measured["peak_gib"][0]
        return row | {
            "ok": True,
            "tok_s": round(measured["tok_s"], 1),
            "peak_gib": peak,
            "steady_peak_gib": measured["steady_peak_gib"][0],
            "timed_steps": measured["timed_steps"],
            "loss_first": measured["loss_first"],
            "gpu": measured["gpu"],
            "versions": measured["versions"],
        }
    tail = log_path.read_text(errors="replace").strip().splitlines()[-12:] if log_path.exists() else []
    why = f"timed out after {limit:.0f} s" if code is None else f"exit {code}"
    return row | {"ok": False, "error": why, "log_tail": tail}


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as markdown: tok/s, peak, the estimate and their ratio."""
    lines = [
        "| recompute | seq | ok | tok/s | peak GiB | estimate GiB | measured / estimate | wall s | note |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        estimate, peak = row.get("estimate_gib"), row.get("peak_gib")
        ratio = f"{peak / estimate:.3f}" if peak and estimate else ""
        note = "" if row["ok"] else row["error"]
        lines.append(
            f"| {row['recompute']} | {row['seq']:,} | {'yes' if row['ok'] else 'no'} | {row.get('tok_s', '')} | "
            f"{peak or ''} | {estimate or ''} | {ratio} | {row['wall_s']} | {note} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", default="llama-3.1-70b", help="a benchmarks/llama_shapes.py shape, or tiny")
    parser.add_argument("--rows", nargs="+", type=parse_row, default=[parse_row(r) for r in DEFAULT_ROWS])
    parser.add_argument("--deadline", type=float, default=560.0, help="seconds for the whole call")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    sys.path.insert(0, str(HERE))
    from multigpu_job import shape_config

    args.out.mkdir(parents=True, exist_ok=True)
    config_dir = Path(tempfile.mkdtemp(prefix="qlora-70b-config-"))
    shape_config(args.shape).save_pretrained(config_dir)
    rows: list[dict[str, Any]] = []
    took: dict[str, tuple[int, float]] = {}  # recompute mode -> (seq, seconds) of its last finished row
    for mode, seq in args.rows:
        left = args.deadline - (time.perf_counter() - started)
        last_seq, last_s = took.get(mode, (0, 0.0))
        # a long row's time is mostly attention's, which grows with the square of the length; a
        # short row's is mostly the process's start, which predicts nothing
        needed = last_s * max(seq / last_seq, 1.0) ** 2 if last_seq >= LONG else 60.0
        if left < needed:
            row = {"shape": args.shape, "recompute": mode, "seq": seq, "ok": False, "wall_s": 0}
            row["error"] = f"skipped: {left:.0f} s left, about {needed:.0f} s needed"
        else:
            print(f"{mode}:{seq} ({left:.0f} s left)", flush=True)
            row = run_row(args.shape, mode, seq, args.out, left - 5)
            row["estimate_gib"] = estimate_gib(config_dir, mode, seq)
            if row["ok"]:
                took[mode] = (seq, float(row["wall_s"]))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("versions", "log_tail")}), flush=True)
        (args.out / "one_gpu_70b.json").write_text(json.dumps(rows, indent=1) + "\n")
        (args.out / "one_gpu_70b.md").write_text(table(rows))
    print(table(rows), flush=True)
    return 0 if any(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
