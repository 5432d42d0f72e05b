#!/usr/bin/env python3
"""Issue 15, item 4: the longest batch-1 row each system trains on one GPU, with its step time and peak.

    python benchmarks/long_context.py --out DIR [--runs SHAPE/VARIANT[:LEN,LEN,...] ...]
        [--steps 2] [--warmup 1] [--single-step-from 131072] [--deadline S] [--attempt-limit S]

A run is one shape (``bench_config.SHAPES``: 1b, 8b, tiny) and one variant of
``bench_config.VARIANTS`` (``trl-qlora``: TRL's own 4-bit path; ``qlora-plugin-memory``: the
recipe with ``gradient_checkpointing="offload"``, through SFTTrainer), tried at lengths going
up (default :data:`LENGTHS`). Each attempt is ``bench_qlora.py run`` at batch 1 x that length
(``BENCH_BATCH``/``BENCH_SEQ``), the code path of the other benchmarks, in a child process
group with a time limit: an out-of-memory error or a kill ends only that attempt. A run stops
at its first failure, or when its next attempt's predicted time (the last step time scaled by
the square of the length ratio, attention's growth) does not fit its limit or the deadline; the
row says why. From ``--single-step-from`` tokens on, an attempt times one step and no warm-up.

Rows: shape, variant, seq, batch 1, ok, error, step_s, tok_s, peak_gib
(``torch.cuda.max_memory_allocated``), estimate_gib (``qlora estimate``'s allocator peak for
the row), gpu, versions, and the attempt's own fields (losses, the plugin's log lines). Per run:
``max_seq``, the longest length that trained. After every attempt ``long_context.json``,
``long_context.md`` and a plot of peak memory against length (``long_context.png`` with
matplotlib, else ``long_context.svg``) are rewritten in ``--out``, so a killed call keeps what
was measured. ``--replot DIR`` redraws the table and plot from a ``long_context.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from multigpu import failure_text, run_group  # noqa: E402

LENGTHS: dict[str, tuple[int, ...]] = {
    "tiny": (64, 128, 256),
    "1b": (32768, 65536, 131072, 262144, 400000, 524288, 786432),
    "8b": (32768, 65536, 131072, 262144, 400000, 524288),
}
DEFAULT_RUNS = ("1b/trl-qlora", "1b/qlora-plugin-memory", "8b/trl-qlora", "8b/qlora-plugin-memory")
GPU_GIB = 79.0  # an H100 80GB as torch sees it; only for the plot's line
MIN_ATTEMPT_SECONDS = 20  # below this no attempt can load its model: skipped, and the row says so
STARTUP_SECONDS = {"tiny": 15.0, "1b": 40.0, "8b": 60.0}  # imports, model load, trainer setup (first guess)


@dataclass
class Clock:
    """Seconds since start, and what ``--deadline`` leaves."""

    deadline: float | None
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - (time.monotonic() - self.started)


@dataclass(frozen=True)
class Run:
    """One shape and variant, and the lengths to try, ascending."""

    shape: str
    variant: str
    lengths: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> Run:
        head, _, tail = text.partition(":")
        shape, _, variant = head.partition("/")
        if shape not in LENGTHS or not variant:
            raise SystemExit(f"--runs {text!r}: expected SHAPE/VARIANT[:LEN,...] with SHAPE one of {list(LENGTHS)}")
        lengths = tuple(sorted(int(x) for x in tail.split(",") if x)) if tail else LENGTHS[shape]
        return cls(shape, variant, lengths)


def predicted_seconds(seq: int, steps: int, last: dict[str, Any] | None, startup: float) -> float | None:
    """Time an attempt at ``seq`` should take: startup plus ``steps`` steps scaled quadratically from ``last``."""
    if not last or not last.get("step_s"):
        return None
    step = last["step_s"] * (seq / last["seq"]) ** 2
    return startup + steps * step


def steps_for(seq: int, args: argparse.Namespace) -> tuple[int, int]:
    """(warm-up, timed) steps of an attempt at ``seq``: one step alone from ``--single-step-from`` on."""
    return (0, 1) if seq >= args.single_step_from else (args.warmup, args.steps)


def child_env(seq: int, device: str) -> dict[str, str]:
    """The attempt's environment: batch 1 x ``seq``, this repository's ``src`` first on the path."""
    env = dict(os.environ)
    env.update(BENCH_SEQ=str(seq), BENCH_BATCH="1", BENCH_DEVICE=device)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO / "src"), os.environ.get("PYTHONPATH", "")] if p)
    return env


def make_model(shape: str, root: Path, device: str, clock: Clock, log: Path) -> str | None:
    """The shape's bf16 + NF4 checkpoints under ``root`` (made once, in a child); an error text, or None."""
    if (root / f"{shape}-nf4" / "config.json").exists():
        return None
    limit = clock.left() - 5
    if limit < MIN_ATTEMPT_SECONDS:
        return f"skipped: {max(limit, 0):.0f} s left of --deadline before the {shape} model was made"
    command = [sys.executable, str(HERE / "bench_qlora.py"), "make-model", "--shape", shape, "--dir", str(root)]
    code = run_group(command, child_env(2048, device), limit, log)
    if code == 0:
        shutil.rmtree(root / f"{shape}-bf16", ignore_errors=True)  # the attempts load the NF4 copy only
        return None
    return f"making the {shape} model failed: " + ("timed out" if code is None else failure_text(log, []))


def estimate_gib(shape: str, variant: str, seq: int, model_root: Path) -> float | None:
    """``qlora estimate``'s allocator peak (GiB) for the row: the recipe's path, or TRL's (see NOTES.md)."""
    try:
        from bench_config import VARIANTS
        from bench_models import make_recipe, model_dirs

        from qlora_plugin import qlora_recipe
        from qlora_plugin.fastpath.stash_plan import host_memory
        from qlora_plugin.tools.estimate import GIB, estimate, training_path

        spec = VARIANTS[variant]
        if spec.get("unsloth"):  # its own kernels and offload: nothing of the estimate's models applies
            return None
        _, nf4_dir = model_dirs(model_root, shape)
        if "recipe" in spec:
            recipe = make_recipe(spec)
            keep = int(os.environ.get("QLORA_OFFLOAD_KEEP_LAYERS") or 0)  # what the attempt's fast path reads
            offload = recipe.gradient_checkpointing == "offload"
            path = training_path(
                recipe,
                offload_keep_layers=keep if offload else 0,
                host_available=host_memory()[0] if offload else None,  # this host's room, as the attempt's split saw it
            )
        else:  # TRL's path: PEFT's LoRA in bf16 over the bf16 base, TRL's chunked loss, full recompute
            recipe = qlora_recipe(lora_dropout=spec["dropout"])
            path = training_path(recipe, "fast", kernels=False, adapter_dtype="bfloat16", tiled_mlp=False)
        return round(estimate(nf4_dir, recipe, seq, 1, path).allocator_peak / GIB, 2)
    except Exception as error:  # the row keeps its measurements
        print(f"estimate failed for {shape} {variant} {seq}: {type(error).__name__}: {error}", flush=True)
        return None


def attempt(run: Run, seq: int, args: argparse.Namespace, clock: Clock, last: dict[str, Any] | None) -> dict[str, Any]:
    """One length of one run: the child's row with ``ok``, or ``ok=False`` and why."""
    row: dict[str, Any] = {"shape": run.shape, "variant": run.variant, "seq": seq, "batch": 1, "ok": False}
    row["estimate_gib"] = estimate_gib(run.shape, run.variant, seq, Path(args.model_root))
    warmup, steps = steps_for(seq, args)
    limit = min(args.attempt_limit, clock.left() - 5)
    startup = (last or {}).get("startup_s") or STARTUP_SECONDS.get(run.shape, 60.0)
    predicted = predicted_seconds(seq, warmup + steps, last, startup)
    row["predicted_s"] = None if predicted is None else round(predicted, 1)
    if limit < MIN_ATTEMPT_SECONDS:
        row["error"] = f"skipped: {max(limit, 0):.0f} s left of --deadline"
        return row
    if predicted is not None and predicted > limit:
        row["error"] = (
            f"skipped: predicted {predicted:.0f} s (steps scale with the square of the length), limit {limit:.0f} s"
        )
        return row
    work = Path(args.out) / "attempts"
    work.mkdir(parents=True, exist_ok=True)
    name = f"{run.shape}-{run.variant}-{seq}"
    out, log = work / f"{name}.json", work / f"{name}.log"
    out.unlink(missing_ok=True)
    command = [sys.executable, str(HERE / "bench_qlora.py"), "run", "--shape", run.shape, "--variant", run.variant]
    command += ["--model-dir", str(args.model_root), "--json", str(out), "--steps", str(steps)]
    command += ["--warmup", str(warmup), "--logging-steps", "1"]
    started = time.monotonic()
    code = run_group(command, child_env(seq, args.device), limit, log)
    row["wall_s"] = round(time.monotonic() - started, 1)
    row["limit_s"] = round(limit, 1)
    if code == 0 and out.exists():
        measured = json.loads(out.read_text())[-1]
        keep = {k: v for k, v in measured.items() if k not in ("shape", "variant", "seq", "batch")}
        row.update(keep, ok=True)
        row["startup_s"] = round(max(row["wall_s"] - (warmup + steps) * float(measured["step_s"]), 0.0), 1)
    elif code is None:
        row["error"] = f"timed out after {limit:.0f} s"
    else:
        text = failure_text(log, [])
        oom = "out of memory" in text.lower() or "OutOfMemoryError" in text
        row["error"] = ("out of memory: " if oom else f"exit {code}: ") + text
        if code is not None and code < 0:
            row["error"] = f"killed by signal {-code} (host memory?): " + text
    return row


def max_seq(rows: list[dict[str, Any]], shape: str, variant: str) -> int | None:
    """The longest length of ``shape``/``variant`` that trained."""
    ok = [r["seq"] for r in rows if r["shape"] == shape and r["variant"] == variant and r.get("ok")]
    return max(ok) if ok else None


def summary(rows: list[dict[str, Any]], stopped: dict[str, str]) -> list[dict[str, Any]]:
    """Per run: ``max_seq``, its step time and peak, and why the run stopped."""
    out = []
    for key in dict.fromkeys(f"{r['shape']}/{r['variant']}" for r in rows):
        shape, variant = key.split("/", 1)
        longest = max_seq(rows, shape, variant)
        best = next((r for r in rows if r["shape"] == shape and r["variant"] == variant and r["seq"] == longest), {})
        out.append(
            {
                "shape": shape,
                "variant": variant,
                "max_seq": longest,
                "step_s": best.get("step_s"),
                "tok_s": best.get("tok_s"),
                "peak_gib": best.get("peak_gib"),
                "estimate_gib": best.get("estimate_gib"),
                "stopped": stopped.get(key, ""),
            }
        )
    return out


def table(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    """The markdown of ``long_context.md``: one line per run, then every attempt."""
    lines = [
        "# Longest batch-1 row per system (one GPU)",
        "",
        "| shape | variant | max_seq | step s | tok/s | peak GiB | estimate GiB | stopped because |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        cells = [r["shape"], r["variant"], r["max_seq"], r["step_s"], r["tok_s"], r["peak_gib"], r["estimate_gib"]]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + f" | {r['stopped']} |")
    lines += [
        "",
        "| shape | variant | seq | ok | step s | tok/s | peak GiB | estimate GiB | measured / estimate | error |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = round(r["peak_gib"] / r["estimate_gib"], 3) if r.get("peak_gib") and r.get("estimate_gib") else None
        cells = [r["shape"], r["variant"], r["seq"], "yes" if r.get("ok") else "no", r.get("step_s"), r.get("tok_s")]
        cells += [r.get("peak_gib"), r.get("estimate_gib"), ratio, (r.get("error") or "")[:200].replace("|", "/")]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    gpus = sorted({r["gpu"] for r in rows if r.get("gpu")})
    lines += ["", f"GPU: {', '.join(gpus) or '-'}. Peak: torch.cuda.max_memory_allocated over the timed steps."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], out: Path) -> Path:
    """Peak GiB against length, one line per shape/variant (measured) and its estimate (dashed)."""
    series: dict[str, list[tuple[int, float, float | None]]] = {}
    for r in rows:
        if r.get("ok") and r.get("peak_gib") is not None:
            series.setdefault(f"{r['shape']} {r['variant']}", []).append(
                (r["seq"], r["peak_gib"], r.get("estimate_gib"))
            )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _svg_plot(series, out / "long_context.svg")
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in sorted(series.items()):
        xs, ys, es = zip(*sorted(points), strict=True)
        (line,) = ax.plot(xs, ys, marker="o", label=f"{label} (measured)")
        if all(e is not None for e in es):
            ax.plot(xs, es, linestyle="--", color=line.get_color(), label=f"{label} (qlora estimate)")
    ax.axhline(GPU_GIB, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens in the row (batch 1)")
    ax.set_ylabel("peak GiB (max_memory_allocated)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    path = out / "long_context.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _svg_plot(series: dict[str, list[tuple[int, float, float | None]]], path: Path) -> Path:
    """The same plot as an SVG drawn by hand (no matplotlib on the machine): log2 x, linear y."""
    import math

    width, height, pad = 720, 420, 60
    xs = [p[0] for points in series.values() for p in points] or [1, 2]
    top = max([GPU_GIB] + [p[1] for points in series.values() for p in points])
    lo, hi = math.log2(min(xs)), math.log2(max(xs)) + 1e-9

    def at(seq: float, gib: float) -> tuple[float, float]:
        x = pad + (math.log2(seq) - lo) / max(hi - lo, 1e-9) * (width - 2 * pad)
        return x, height - pad - gib / top * (height - 2 * pad)

    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">']
    parts.append(f'<rect width="{width}" height="{height}" fill="white"/>')
    y_gpu = at(2**lo, GPU_GIB)[1]
    parts.append(f'<line x1="{pad}" x2="{width - pad}" y1="{y_gpu:.1f}" y2="{y_gpu:.1f}" stroke="grey"/>')
    parts.append(f'<text x="{pad}" y="{height - 20}">tokens in the row (log2), peak GiB up to {top:.0f}</text>')
    for i, (label, points) in enumerate(sorted(series.items())):
        color = colors[i % len(colors)]
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in (at(s, g) for s, g, _ in sorted(points)))
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
        for s, g, _ in points:
            x, y = at(s, g)
            parts.append(f'<text x="{x:.1f}" y="{y - 4:.1f}" fill="{color}">{s}: {g}</text>')
        parts.append(f'<text x="{pad + 5}" y="{pad / 2 + 14 * i}" fill="{color}">{label}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))
    return path


def save(out: Path, rows: list[dict[str, Any]], stopped: dict[str, str]) -> None:
    """Rewrite ``long_context.json``, ``.md`` and the plot from everything measured so far."""
    runs = summary(rows, stopped)
    (out / "long_context.json").write_text(json.dumps({"runs": runs, "rows": rows}, indent=1))
    (out / "long_context.md").write_text(table(rows, runs))
    plot(rows, out)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="results folder")
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="SHAPE/VARIANT[:LEN,LEN,...]")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per attempt (below --single-step-from)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps per attempt (below --single-step-from)")
    parser.add_argument("--single-step-from", type=int, default=131072, help="from this length: one step, no warm-up")
    parser.add_argument("--deadline", type=float, help="seconds for the whole call; attempts are cut or skipped to fit")
    parser.add_argument("--attempt-limit", type=float, default=580.0, help="seconds one attempt may take")
    parser.add_argument("--model-root", default=None, help="where the shapes' NF4 checkpoints are made (default /tmp)")
    parser.add_argument("--device", default=os.environ.get("BENCH_DEVICE", "cuda"), choices=("cuda", "cpu"))
    parser.add_argument("--replot", metavar="DIR", help="redraw DIR's table and plot from its long_context.json")
    args = parser.parse_args(argv)
    if not args.replot and not args.out:
        parser.error("--out is required")
    # on disk, not in /dev/shm: offloaded layer inputs need the host's memory (97.7 GiB at 8B x 400,000 tokens)
    args.model_root = args.model_root or "/tmp/qlora-long-context"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.replot:
        data = json.loads((Path(args.replot) / "long_context.json").read_text())
        save(Path(args.replot), data["rows"], {r["shape"] + "/" + r["variant"]: r["stopped"] for r in data["runs"]})
        return 0
    clock = Clock(args.deadline)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.model_root).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    stopped: dict[str, str] = {}
    broken: dict[str, str] = {}  # shapes whose model could not be made
    for run in [Run.parse(text) for text in args.runs]:
        key = f"{run.shape}/{run.variant}"
        if run.shape not in broken:
            error = make_model(run.shape, Path(args.model_root), args.device, clock, out / f"make-{run.shape}.log")
            if error:
                broken[run.shape] = error
        last: dict[str, Any] | None = None
        for seq in run.lengths:
            if run.shape in broken:
                rows.append({"shape": run.shape, "variant": run.variant, "seq": seq, "batch": 1, "ok": False})
                rows[-1]["error"] = broken[run.shape]
                stopped[key] = broken[run.shape]
                break
            row = attempt(run, seq, args, clock, last)
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in ("shape", "variant", "seq", "ok", "step_s", "peak_gib", "error")}))
            save(out, rows, stopped)
            if not row["ok"]:
                stopped[key] = f"{seq}: {row['error']}"
                break
            last = row
        else:
            stopped[key] = "every length given trained"
        save(out, rows, stopped)
    for r in summary(rows, stopped):
        print(f"{r['shape']} {r['variant']}: max_seq {r['max_seq']} ({r['stopped']})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
