#!/usr/bin/env python3
"""Issue 17 on a machine with two GPUs: one GPU, DDP, FSDP2 and DeepSpeed ZeRO-3 with the recipe, and the 70B shape.

    python benchmarks/multigpu.py --out DIR [STAGE ...] [--variants ...] [--steps N] [--deadline S]

Stages (default ``8b 70b``), run in the order given:

* ``8b``: the Llama-3.1-8B shape (random init) saved once as a bf16 checkpoint, then
  ``single-gpu`` (GPU 0, gradient accumulation 2: the global batch of two GPUs), ``ddp-2gpu``
  and ``fsdp2-2gpu`` (``accelerate launch`` with ``configs/accelerate/ddp.yaml`` and
  ``fsdp2.yaml``; the FSDP2 run also saves its adapter and checks it), bs 4 x 2048 per GPU,
  30 steps timed over the last 25.
* ``70b``: the Llama-3.1-70B shape, ``fsdp2-2gpu`` only, bs 1 x 2048, 10 steps timed over the
  last 7; no checkpoint: every rank builds the model straight into 4 bits, one decoder layer
  at a time (``benchmarks/build_quantized.py``).
* ``tiny``: a two-layer Llama on a CPU (float32, gloo; accelerate's FSDP falls back to DDP
  there, though the recipe still sees the FSDP launch): the logic of the three variants, the
  adapter check included, in about 15 s each.
* any other shape of ``benchmarks/llama_shapes.py``: the three variants with the 8b settings.

``deepspeed-zero3-2gpu`` (``accelerate launch`` with ``configs/accelerate/deepspeed-zero3.yaml``;
it saves and checks its adapter too) runs only where ``--variants`` names it, and needs
``deepspeed`` importable (``WHEELS="pinned deepspeed"`` on the device); without it the row says
it was skipped and why. On a CPU (``tiny``) it runs on DeepSpeed's CPU accelerator over gloo,
with ``--mixed_precision no`` (the tiny job computes in float32).

``--variants``, ``--steps``, ``--warmup``, ``--batch``, ``--seq`` and ``--build-in-place``
override every stage named. Each variant runs ``benchmarks/multigpu_job.py`` as its own process
group with a time limit (its stage's, cut to what ``--deadline`` leaves), killed whole on
expiry, so one hang does not eat the call. Every row gets ``qlora estimate``'s per-GPU
allocator peak for its shape, GPUs, strategy, batch and sequence (the recipe the job trains),
and its measured per-GPU training peak (FSDP's sharding moment included) over that
estimate. After each variant: ``multigpu.json`` (the rows), ``multigpu.md`` (table and
targets) and ``variants.log`` (each variant's log tail).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VARIANTS = ("single-gpu", "ddp-2gpu", "fsdp2-2gpu")  # each stage's default
ZERO3 = "deepspeed-zero3-2gpu"
ALL_VARIANTS = (*VARIANTS, ZERO3)  # what --variants may name
CONFIGS = {"ddp-2gpu": "ddp.yaml", "fsdp2-2gpu": "fsdp2.yaml", ZERO3: "deepspeed-zero3.yaml"}
SHARDED = ("fsdp2-2gpu", ZERO3)  # compared with DDP's losses; their 4-bit bytes are checked
MIN_VARIANT_SECONDS = 45  # below this a variant cannot even load: it is skipped, and says so
LOG_TAIL_LINES = 80


@dataclass(frozen=True)
class Stage:
    """One shape and the variants run on it, with their settings and time limits (seconds)."""

    shape: str
    variants: tuple[str, ...] = VARIANTS
    batch: int = 4
    seq: int = 2048
    steps: int = 30
    warmup: int = 5
    build_in_place: bool = False
    save_adapter: tuple[str, ...] = SHARDED
    learning_rate: float | None = None  # None: the recipe's
    zero3_persistence_threshold: int | None = None  # None: DeepSpeed's (1e5 elements)
    limits: dict[str, int] = field(
        default_factory=lambda: {"single-gpu": 150, "ddp-2gpu": 120, "fsdp2-2gpu": 180, ZERO3: 240}
    )

    @property
    def cpu(self) -> bool:
        return self.shape == "tiny"


STAGES: dict[str, Stage] = {
    "8b": Stage("llama-3.1-8b"),
    "70b": Stage(
        "llama-3.1-70b",
        variants=("fsdp2-2gpu",),
        batch=1,
        steps=10,
        warmup=3,
        build_in_place=True,
        save_adapter=(),
        limits={"fsdp2-2gpu": 480},
    ),
    # lr 5e-3: at the recipe's 2e-4 the tiny model's losses barely move, and would agree whatever the update
    # persistence 0: DeepSpeed keeps parameters under 1e5 elements whole on every rank, i.e. all of the tiny shape's
    "tiny": Stage(
        "tiny",
        batch=2,
        seq=32,
        steps=4,
        warmup=1,
        learning_rate=5e-3,
        zero3_persistence_threshold=0,
        limits=dict.fromkeys(ALL_VARIANTS, 240),
    ),
}


class Clock:
    """Seconds since the orchestrator started, and one printed line per stage event."""

    def __init__(self, deadline: float | None) -> None:
        self.started = time.monotonic()
        self.deadline = deadline

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float | None:
        return None if self.deadline is None else self.deadline - self.elapsed

    def say(self, text: str) -> None:
        print(f"[{self.elapsed:5.0f} s {time.strftime('%H:%M:%S')}] {text}", flush=True)


def stage_for(name: str, args: argparse.Namespace) -> Stage:
    """The stage ``name`` (a key of :data:`STAGES` or a shape) with the command line's overrides."""
    stage = STAGES.get(name) or Stage(name)
    changes: dict[str, Any] = {
        key: getattr(args, key) for key in ("batch", "seq", "steps", "warmup") if getattr(args, key) is not None
    }
    if args.variants:
        changes["variants"] = tuple(v for v in args.variants if v in ALL_VARIANTS)
    if args.build_in_place:
        changes["build_in_place"] = True
    if args.no_save_adapter:
        changes["save_adapter"] = ()
    return replace(stage, **changes)


def default_model_root() -> Path:
    """``/dev/shm`` where it has room for the 8B checkpoint twice over (fast to write and read), else ``/tmp``."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 40 * 2**30:
        return shm / "qlora-multigpu"
    return Path("/tmp/qlora-multigpu")


def make_checkpoint(shape: str, root: Path, config_only: bool) -> Path:
    """A random-init Llama of ``shape`` saved in bf16 under ``root`` once (only its config with ``config_only``).

    Runs in a child process (:func:`checkpoint`) so the orchestrator never holds a CUDA context.
    """
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(HERE))
    from multigpu_job import shape_config

    target = root / shape
    done = target / ("config-only" if config_only else "complete")
    if done.exists():
        return target
    config = shape_config(shape)
    if config_only:  # every rank builds the weights itself (--build-in-place)
        config.save_pretrained(target)
        done.touch()
        return target
    torch.manual_seed(1234)
    with torch.device("cuda:0" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target, max_shard_size="4GB")
    done.touch()
    return target


def child_env(cpu: bool) -> dict[str, str]:
    """The variant's environment: this repository's ``src`` first on the path; no launch of ours leaks in."""
    ours = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO / "src"), os.environ.get("PYTHONPATH", "")] if p)
    if cpu:
        env["OMP_NUM_THREADS"] = "1"
    return env


def run_group(command: list[str], env: dict[str, str], limit: float, log: Path) -> int | None:
    """Run ``command`` as its own process group, output to ``log``; on ``limit`` kill the whole group (None).

    ``accelerate launch`` starts one process per rank; killing only the launcher would leave
    ranks holding GPU memory for the next variant.
    """
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                try:
                    os.killpg(process.pid, sig)
                    process.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
            return None


def checkpoint(stage: Stage, root: Path, clock: Clock) -> Path:
    """The stage's model directory, made in a child process (a bf16 checkpoint, or a config for in-place builds)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--make-checkpoint", stage.shape]
    command += ["--model-root", str(root)] + (["--build-in-place"] if stage.build_in_place else [])
    log = root / "runs" / f"{stage.shape}-checkpoint.log"
    code = run_group(command, child_env(stage.cpu), max(clock.left() or 600, 1), log)
    if code != 0:
        raise RuntimeError(f"checkpoint of {stage.shape} failed (exit {code}): {failure_text(log, [])}")
    return root / stage.shape


ERROR_LINE = re.compile(
    r"^(?:\[rank\d+\]:\s*)?((?:[\w.]+\.)?[A-Z]\w*(?:Error|Exception|Interrupt|Exit)\b.*|.*Segmentation fault.*)$"
)


def failure_text(log: Path, error_files: list[Path]) -> str:
    """The exact failure: each failing rank's exception (its error file), else the log's last exception line."""
    seen: dict[str, list[int]] = {}
    for path in error_files:
        record = json.loads(path.read_text())
        seen.setdefault(record["error"][:1500], []).append(record["rank"])
    if seen:
        return " | ".join(f"rank {','.join(map(str, sorted(r)))}: {text}" for text, r in seen.items())
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    matches = [m.group(1).strip() for line in lines if (m := ERROR_LINE.match(line.strip()))]
    if matches:
        return matches[-1][:1500]
    signals = [line.strip() for line in lines if "exitcode" in line and "-" in line.split("exitcode")[-1]]
    return (signals[-1] if signals else " | ".join(lines[-4:]))[:1500]


def launch_command(variant: str, processes: int = 2, cpu: bool = False) -> list[str]:
    """How ``variant`` starts ``multigpu_job.py``: alone, or by ``accelerate launch`` with the repository's config.

    On a CPU the recipe sets ``use_cpu`` (gloo DDP), except under DeepSpeed, which runs on its
    CPU accelerator there, without the config's bf16 (``cpu``).
    """
    job = str(HERE / "multigpu_job.py")
    if variant == "single-gpu":
        return [sys.executable, job, "--grad-accum", "2"]
    config = REPO / "configs" / "accelerate" / CONFIGS[variant]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    launcher += ["--mixed_precision", "no"] if cpu and variant == ZERO3 else []
    return [*launcher, "--num_processes", str(processes), job]


def missing_package(variant: str) -> str | None:
    """Why ``variant`` cannot run here (a package it needs is not importable), or None."""
    import importlib.util

    if variant == ZERO3 and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install deepspeed; on the device WHEELS='pinned deepspeed')"
    return None


def run_variant(stage: Stage, variant: str, model_dir: Path, work: Path, clock: Clock) -> dict[str, Any]:
    """One variant's row: the job's measurements, or ``error`` with the exact failure; the estimate either way."""
    row: dict[str, Any] = {"shape": stage.shape, "variant": variant, "gpus": 1 if variant == "single-gpu" else 2}
    name = f"{stage.shape}-{variant}"
    out, log = work / f"{name}.json", work / f"{name}.log"
    for stale in [out, *work.glob(f"{name}.rank*.error.json"), *work.glob(f"{name}.rank*.progress.json")]:
        stale.unlink(missing_ok=True)
    limit = float(stage.limits.get(variant, 240))
    left = clock.left()
    if left is not None:
        limit = min(limit, left - 10)
    if limit < MIN_VARIANT_SECONDS:
        row["error"] = f"skipped: {max(limit, 0):.0f} s left of --deadline"
        return row | {"estimate_gib": estimate_gib(model_dir, stage, variant)}
    if missing := missing_package(variant):
        row["error"] = f"skipped: {missing}"
        return row | {"estimate_gib": estimate_gib(model_dir, stage, variant)}
    command = launch_command(variant, cpu=stage.cpu) + ["--model-dir", str(model_dir), "--out", str(out)]
    command += ["--steps", str(stage.steps), "--seq", str(stage.seq), "--batch", str(stage.batch)]
    command += ["--warmup", str(stage.warmup)]
    command += ["--compute-dtype", "float32"] if stage.cpu else []
    command += ["--learning-rate", str(stage.learning_rate)] if stage.learning_rate else []
    command += ["--build-in-place"] if stage.build_in_place else []
    command += ["--save-adapter"] if variant in stage.save_adapter else []
    if variant == ZERO3 and stage.zero3_persistence_threshold is not None:
        command += ["--zero3-persistence-threshold", str(stage.zero3_persistence_threshold)]
    env = child_env(stage.cpu)
    if variant == "single-gpu":
        env["CUDA_VISIBLE_DEVICES"] = "0"
    started = time.monotonic()
    code = run_group(command, env, limit, log)
    if out.exists():  # written before the adapter is saved: a crash there keeps the measurements
        row.update(json.loads(out.read_text()))
    failed = None
    if code is None:
        failed = f"timed out after {limit:.0f} s"
    elif code != 0 or not out.exists():
        failed = f"exit {code}: " + failure_text(log, sorted(work.glob(f"{name}.rank*.error.json")))
    if failed and out.exists():
        row["error_after_row"] = failed  # the measurements stand; what came after them (the adapter save) failed
    elif failed:
        row["error"] = failed
        row["progress"] = [json.loads(p.read_text()) for p in sorted(work.glob(f"{name}.rank*.progress.json"))]
    row["wall_s"] = round(time.monotonic() - started, 1)
    row["limit_s"] = round(limit)
    row["estimate_gib"] = estimate_gib(model_dir, stage, variant)
    peaks = row.get("peak_gib") or row.get("steady_peak_gib")  # the training peak: sharding and steps
    if peaks and max(peaks) > 0 and row["estimate_gib"]:  # no peaks on a CPU
        row["estimate_ratio"] = round(max(peaks) / row["estimate_gib"], 3)  # measured / predicted
    return row


def estimate_gib(model_dir: Path, stage: Stage, variant: str) -> float | None:
    """``qlora estimate``'s allocator peak per GPU (GiB) for the recipe the job trains; None if it fails.

    DeepSpeed ZeRO-3 is estimated as ``fsdp`` (the estimate has no ZeRO-3 strategy): both
    partition weights, gradients and optimizer states and gather a layer at a time; ZeRO-3's
    prefetch and bucket sizes are not modelled.
    """
    from qlora_plugin.tools.estimate import GIB, Parallel, estimate

    sys.path.insert(0, str(HERE))
    from multigpu_job import job_recipe

    gpus = 1 if variant == "single-gpu" else 2
    strategy = "fsdp" if variant in SHARDED else "ddp"
    try:
        recipe = job_recipe("float32" if stage.cpu else "auto", stage.learning_rate)
        result = estimate(model_dir, recipe, stage.seq, stage.batch, parallel=Parallel(gpus, strategy))
    except Exception as error:  # the row keeps its measurements
        print(f"estimate failed for {stage.shape} {variant}: {type(error).__name__}: {error}", flush=True)
        return None
    return round(result.allocator_peak / GIB, 3)


def loss_gap(row: dict[str, Any], base: dict[str, Any] | None) -> float | None:
    """The largest relative difference of ``row``'s logged losses from ``base``'s, in percent."""
    if not base or base is row or row.get("error") or base.get("error"):
        return None
    ours, theirs = row.get("losses") or [], base.get("losses") or []
    if not ours or len(ours) != len(theirs):
        return None
    return round(max(abs(a - b) / abs(b) for a, b in zip(ours, theirs, strict=True)) * 100, 3)


def annotate(rows: list[dict[str, Any]]) -> None:
    """Per row: speed over one GPU and the loss gaps to one GPU and to DDP of the same shape."""
    for row in rows:
        same = {r["variant"]: r for r in rows if r["shape"] == row["shape"] and not r.get("error")}
        single, ddp = same.get("single-gpu"), same.get("ddp-2gpu")
        if single and not row.get("error") and row is not single:
            row["speedup_vs_single"] = round(row["tok_s"] / single["tok_s"], 3)
        row["loss_gap_vs_single_pct"] = loss_gap(row, single)
        if row["variant"] in SHARDED:
            row["loss_gap_vs_ddp_pct"] = loss_gap(row, ddp)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 17's GPU targets, each met, MISSED or not measured, from the rows."""

    def find(shape: str, variant: str) -> dict[str, Any]:
        return next((r for r in rows if r["shape"] == shape and r["variant"] == variant), {})

    def verdict(value: Any, ok: bool) -> str:
        return "-, not measured" if value is None else f"{value}, {'met' if ok else 'MISSED'}"

    ddp, fsdp, big = (
        find("llama-3.1-8b", "ddp-2gpu"),
        find("llama-3.1-8b", "fsdp2-2gpu"),
        find("llama-3.1-70b", "fsdp2-2gpu"),
    )
    speed, gap = ddp.get("speedup_vs_single"), ddp.get("loss_gap_vs_single_pct")
    lines = [
        f"8B DDP tok/s over one GPU >= 1.85x: {verdict(speed, (speed or 0) >= 1.85)}",
        f"8B DDP losses within 1 % of one GPU (largest gap %): {verdict(gap, (gap or 0) <= 1)}",
    ]
    for label, row in (("FSDP2", fsdp), ("DeepSpeed ZeRO-3", find("llama-3.1-8b", ZERO3))):
        trained = bool(row.get("losses")) and not row.get("error") if row else None
        gap = row.get("loss_gap_vs_ddp_pct")
        adapter = row.get("adapter")
        whole = adapter and all(adapter.get(k) for k in ("shapes_match", "finite", "config"))
        lines.append(f"8B {label} trains: {verdict(trained, bool(trained))}")
        lines.append(f"8B {label} losses within 1 % of DDP (largest gap %): {verdict(gap, (gap or 0) <= 1)}")
        saved = verdict(json.dumps(adapter) if adapter else None, bool(whole))
        lines.append(f"8B {label} adapter saved whole: {saved}")
    worst = max(big["peak_gib"] + big["load_peak_gib"]) if big.get("peak_gib") else None
    lines.append(f"70B FSDP2 per-GPU peak (load or train) <= 70 GiB: {verdict(worst, (worst or 0) <= 70)}")
    if big.get("error"):
        lines[-1] += f" ({big['error'][:300]})"
    for row in rows:
        ratio = row.get("estimate_ratio")
        if ratio is not None:
            name = f"{row['shape']} {row['variant']}"
            lines.append(
                f"estimate within 15 %, {name} (train peak / estimate): {verdict(ratio, abs(ratio - 1) <= 0.15)}"
            )
        changed = row.get("weights_changed")
        engine = row.get("sharding") or ("FSDP" if row.get("fsdp") else None)  # rows before ZeRO-3 say only fsdp
        if changed is not None and engine:
            checked = sum(row.get("weights_checked", []))
            lines.append(
                f"4-bit bytes intact under {engine}, {row['shape']} ({checked} layer copies checked; changed): "
                f"{verdict(sum(changed), sum(changed) == 0 and checked > 0)}"
            )
        held = row.get("local_4bit_fraction")
        if held and engine:
            split = all(abs(f * row["gpus"] - 1) < 0.05 for f in held)  # each rank holds about 1/N
            lines.append(
                f"4-bit weights partitioned under {engine}, {row['shape']} (each rank's resident share of the "
                f"packed elements): {verdict(held, split)}"
            )
    return lines


def table(rows: list[dict[str, Any]]) -> str:
    """``multigpu.md``: one line per row, then the targets."""

    def gib(values: list[float] | None) -> str:
        return ", ".join(f"{v:.2f}" for v in values) if values else ""

    lines = [
        "| shape | variant | GPUs | tok/s | vs one GPU | steady peak GiB/GPU | train peak GiB/GPU | load peak GiB/GPU "
        "| estimate GiB | measured/estimate | loss first / last | loss gap % (vs 1 GPU / vs DDP) | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        estimate = row.get("estimate_gib")
        if row.get("error"):
            reached = "; ".join(f"rank {p['rank']}: {p['phase']} at {p['seconds']} s" for p in row.get("progress", []))
            note = row["error"][:400] + (f" (reached {reached})" if reached else "")
            lines.append(
                f"| {row['shape']} | {row['variant']} | {row['gpus']} | | | | | | {estimate} | | | | "
                f"{note.replace('|', '/')} |"
            )
            continue
        speed = f"{row['speedup_vs_single']:.2f}x" if row.get("speedup_vs_single") else ""
        gaps = " / ".join(
            "-" if row.get(k) is None else str(row[k])
            for k in ("loss_gap_vs_single_pct", "loss_gap_vs_ddp_pct")
            if k in row
        )
        note = []
        if row.get("adapter"):
            note.append("adapter " + json.dumps(row["adapter"]).replace("|", "/"))
        if row.get("error_after_row"):
            note.append("after the row: " + row["error_after_row"][:300].replace("|", "/"))
        note.append(f"{row['timed_steps']} timed of {row.get('steps')} steps")
        lines.append(
            f"| {row['shape']} | {row['variant']} | {row['gpus']} | {row['tok_s']:,.0f} | {speed} | "
            f"{gib(row.get('steady_peak_gib'))} | {gib(row.get('peak_gib'))} | {gib(row.get('load_peak_gib'))} | "
            f"{estimate} | {row.get('estimate_ratio', '')} | {row['loss_first']:.4f} / {row['loss_last']:.4f} | "
            f"{gaps} | {'; '.join(note)} |"
        )
    device = next((r for r in rows if r.get("gpu")), None)
    about = f"\n{device['gpu']}; {json.dumps(device['versions'])}\n" if device else ""
    return "\n".join(lines) + "\n" + about + "\nTargets:\n" + "".join(f"- {t}\n" for t in targets(rows))


def save(out: Path, rows: list[dict[str, Any]], work: Path, logs: list[str]) -> None:
    """Write ``multigpu.json``, ``multigpu.md`` and ``variants.log`` (each variant's log tail) as they stand now."""
    annotate(rows)
    (out / "multigpu.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "multigpu.md").write_text(table(rows))
    tails = []
    for name in logs:
        log = work / f"{name}.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        head = f"===== {name} (last {LOG_TAIL_LINES} of {len(lines)} lines)\n"
        tails.append(head + "\n".join(lines[-LOG_TAIL_LINES:]))
    (out / "variants.log").write_text("\n\n".join(tails) + "\n")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stages", nargs="*", default=["8b", "70b"], help="8b, 70b, tiny or a shape; in this order")
    parser.add_argument("--out", type=Path, help="where multigpu.json, multigpu.md and variants.log go")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=ALL_VARIANTS,
        help=f"only these (default: each stage's; {ZERO3} only when named)",
    )
    parser.add_argument("--model-root", type=Path, help="checkpoints and job files (default /dev/shm or /tmp)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int, help="steps left out of the timing")
    parser.add_argument("--batch", type=int, help="sequences per GPU per micro-batch")
    parser.add_argument("--seq", type=int)
    parser.add_argument("--build-in-place", action="store_true", help="every stage builds its model on each rank")
    parser.add_argument("--no-save-adapter", action="store_true", help="skip the FSDP2 adapter save and check")
    parser.add_argument("--deadline", type=float, help="seconds for the whole run; variants are cut or skipped to fit")
    parser.add_argument("--make-checkpoint", metavar="SHAPE", help=argparse.SUPPRESS)  # the child of checkpoint()
    args = parser.parse_args(argv)
    if not args.make_checkpoint and args.out is None:
        parser.error("--out is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if str(REPO / "src") not in sys.path:
        sys.path.insert(0, str(REPO / "src"))  # this checkout's package, not an installed one
    root = args.model_root or default_model_root()
    if args.make_checkpoint:
        make_checkpoint(args.make_checkpoint, root, args.build_in_place)
        return 0
    clock = Clock(args.deadline)
    args.out.mkdir(parents=True, exist_ok=True)
    work = root / "runs"
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    logs: list[str] = []
    for name in args.stages:
        stage = stage_for(name, args)
        clock.say(
            f"{name}: {stage.shape}, {', '.join(stage.variants)}; bs {stage.batch} x {stage.seq}, "
            f"{stage.steps} steps ({stage.steps - stage.warmup} timed)"
            + (", built in place on each rank" if stage.build_in_place else "")
        )
        try:
            model_dir = checkpoint(stage, root, clock)
        except Exception as error:
            rows += [{"shape": stage.shape, "variant": v, "gpus": 0, "error": str(error)} for v in stage.variants]
            clock.say(f"{name}: {error}")
            save(args.out, rows, work, logs)
            continue
        logs.append(f"{stage.shape}-checkpoint")
        clock.say(f"{name}: model directory {model_dir}")
        for variant in stage.variants:
            rows.append(run_variant(stage, variant, model_dir, work, clock))
            logs.append(f"{stage.shape}-{variant}")
            save(args.out, rows, work, logs)
            shown = {k: v for k, v in rows[-1].items() if k not in ("losses", "versions")}
            clock.say(f"{name} {variant}: {json.dumps(shown)}")
    print(table(rows), flush=True)
    return 0 if all(not r.get("error") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
