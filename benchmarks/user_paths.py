"""The paths users take, side by side in one call: TRL's 4-bit path, Unsloth, and the plugin as the
README snippet, as a user's own ``SFTConfig``, and at its speed and memory points (issue 22).

    python benchmarks/user_paths.py --out DIR [--shapes 8b,1b] [--rows name,name] [--budget-s 560]
    python benchmarks/user_paths.py --plot DIR/bench.json   # the frontier plot only

Each row is one ``bench_qlora.py run`` process (a crash stays in its row), timed over ``--steps``
after ``--warmup``; tokens are counted by a forward pre-hook (what the model really receives: Unsloth's
trainer accumulates two micro-batches behind ``per_device_train_batch_size``). Rows run in the
order of :data:`ROWS` until the budget is spent; JSON rows, a markdown table and a plot of tok/s
against peak GiB (the frontier) land in ``--out``. Run it through ``user_paths_device.sh``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench_all import _sub, _tail

# row name -> (variant, SFTConfig overrides, FastPathConfig overrides). The order is the order of
# importance: what the issue compares first, then the rows that explain a gap.
ROWS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "trl-qlora": ("trl-qlora", {}, {}),
    "unsloth-qlora": ("unsloth-qlora", {}, {}),
    "qlora-plugin-default": ("qlora-plugin-default", {}, {}),
    "qlora-plugin-own-config": ("qlora-plugin-own-config", {}, {}),
    "qlora-plugin-memory": ("qlora-plugin-memory", {}, {}),
    "qlora-plugin": ("qlora-plugin", {}, {}),
    # what the own-config gap is made of: Liger's loss in place of TRL's chunked_nll, the host syncs,
    # and the full-logit loss some users pick
    "own-config-trl-loss": ("qlora-plugin-own-config", {}, {"fused_loss": False, "loss_outputs": "loss"}),
    "own-config-liger": ("qlora-plugin-own-config", {"use_liger_kernel": True}, {}),
    "own-config-no-sync": (
        "qlora-plugin-own-config",
        {"logging_nan_inf_filter": False, "accelerator_config": {"non_blocking": True}},
        {},
    ),
    "own-config-nll": ("qlora-plugin-own-config", {"loss_type": "nll"}, {}),
    # selective recompute (issue 22 item 1): the README snippet with the first N layers' MLP gate and
    # up outputs kept for the recompute (QLORA_KEEP_MLP_LAYERS=N; benchmarks/NOTES.md, section 16)
    "default-keep-mlp-8": ("qlora-plugin-default", {}, {"keep_mlp_layers": 8}),
    "default-keep-mlp-14": ("qlora-plugin-default", {}, {"keep_mlp_layers": 14}),
    "default-keep-mlp-32": ("qlora-plugin-default", {}, {"keep_mlp_layers": 32}),
    # ... and the first P layers' parked in pinned host memory (QLORA_PARK_MLP_LAYERS=P; section 17)
    "default-keep-14-park-16": ("qlora-plugin-default", {}, {"keep_mlp_layers": 14, "park_mlp_layers": 16}),
    "default-keep-10-park-22": ("qlora-plugin-default", {}, {"keep_mlp_layers": 10, "park_mlp_layers": 22}),
    "default-park-32": ("qlora-plugin-default", {}, {"park_mlp_layers": 32}),
    "memory-park-16": ("qlora-plugin-memory", {}, {"park_mlp_layers": 16}),
    "memory-park-32": ("qlora-plugin-memory", {}, {"park_mlp_layers": 32}),
    # torch's non-reentrant checkpoint in place of the plugin's own recompute (QLORA_TORCH_CHECKPOINT=1;
    # section 19): what the own function buys the snippet and the user's own config
    "default-torch-checkpoint": ("qlora-plugin-default", {}, {"own_recompute": False}),
    "own-config-torch-checkpoint": ("qlora-plugin-own-config", {}, {"own_recompute": False}),
    # CUDA graphs over the recomputed layers (QLORA_RECOMPUTE_GRAPHS=1; section 20)
    "default-recompute-graphs": ("qlora-plugin-default", {}, {"recompute_graphs": True}),
    "own-config-recompute-graphs": ("qlora-plugin-own-config", {}, {"recompute_graphs": True}),
}

# (shape, steps, warmup): 8B steps take about a second
STEPS = {"8b": (8, 2), "1b": (10, 3), "tiny": (2, 1)}


def run_rows(
    out: Path,
    shapes: list[str],
    rows: list[str],
    budget_s: float,
    model_root: Path,
    timing: tuple[int | None, int | None, int] = (None, None, 10),
) -> Path:
    """Every row of every shape into ``out/bench.json`` within ``budget_s``; returns the JSON path.

    ``timing``: (steps, warmup, logging steps); None keeps the shape's :data:`STEPS`.
    """
    log = out / "log.txt"
    results = out / "bench.json"
    deadline = time.time() + budget_s
    for shape in shapes:
        rc = _sub(["make-model", "--shape", shape, "--dir", str(model_root)], log, 300)
        if rc:
            print(f"make-model {shape} failed\n{_tail(log)}", flush=True)
            continue
        steps, warmup = STEPS[shape]
        steps, warmup = timing[0] or steps, warmup if timing[1] is None else timing[1]
        for entry in rows:
            only, _, name = entry.rpartition("/")
            if only and only != shape:
                continue
            variant, trainer_args, plugin = ROWS[name]
            left = deadline - time.time()
            if left < 40:
                print(f"skip {shape}/{name}: budget", flush=True)
                continue
            args = [
                "run",
                "--shape",
                shape,
                "--variant",
                variant,
                "--model-dir",
                str(model_root),
                "--json",
                str(results),
                "--steps",
                str(steps),
                "--warmup",
                str(warmup),
                "--tag",
                name,
                "--logging-steps",
                str(timing[2]),
            ]
            if trainer_args:
                args += ["--trainer-args", json.dumps(trainer_args)]
            if plugin:
                args += ["--plugin", json.dumps(plugin)]
            t0 = time.time()
            rc = _sub(args, log, min(left, 240))
            tail = _tail(log, 1) if rc == 0 else _tail(log, 25)
            print(f"  {shape}/{name} rc={rc} ({time.time() - t0:.0f}s)\n{tail}", flush=True)
    return results


# What each row is, for the table and the plot's legend.
SYSTEM = {
    "trl-qlora": "TRL's 4-bit path",
    "unsloth-qlora": "Unsloth",
    "qlora-plugin-default": "plugin: README snippet",
    "qlora-plugin-own-config": "plugin: own SFTConfig",
    "own-config-trl-loss": "plugin: own SFTConfig, TRL's own loss",
    "qlora-plugin-memory": "plugin: memory point",
    "qlora-plugin": "plugin: speed point",
    "default-keep-mlp-8": "plugin: README snippet, 8 layers keep gate/up",
    "default-keep-mlp-14": "plugin: README snippet, 14 layers keep gate/up",
    "default-keep-mlp-32": "plugin: README snippet, every layer keeps gate/up",
    "default-torch-checkpoint": "plugin: README snippet, torch's checkpoint",
    "default-recompute-graphs": "plugin: README snippet, CUDA graphs over the recompute",
    "own-config-recompute-graphs": "plugin: own SFTConfig, CUDA graphs over the recompute",
}


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table per shape: tok/s, peak, and the ratios to TRL's path and to Unsloth."""
    lines = []
    for shape in sorted({r["shape"] for r in rows}):
        mine = [r for r in rows if r["shape"] == shape]
        base = {r["variant"]: r["tok_s"] for r in mine}
        lines += [
            f"\n**{shape}** ({mine[0].get('gpu', '')})\n",
            "| row | tok/s | tokens/step | step s | peak GiB | vs TRL's path | vs Unsloth | loss first -> last |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        order = list(ROWS)
        for r in sorted(mine, key=lambda r: order.index(r["variant"]) if r["variant"] in order else 99):
            ratio = {
                key: f"{r['tok_s'] / base[key]:.2f}x" if base.get(key) else "" for key in ("trl-qlora", "unsloth-qlora")
            }
            lines.append(
                f"| {r['variant']} | {r['tok_s']:,} | {r.get('tokens_per_step', '')} | {r['step_s']} | "
                f"{r['peak_gib']} | {ratio['trl-qlora']} | {ratio['unsloth-qlora']} | "
                f"{r.get('loss_first')} -> {r.get('loss_last')} |"
            )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """tok/s against peak GiB, one panel per shape, one marker per system (the frontier)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for r in rows:
            if r["shape"] != shape or r["variant"] not in SYSTEM:
                continue
            ax.scatter(r["peak_gib"], r["tok_s"], s=50)
            ax.annotate(
                SYSTEM[r["variant"]], (r["peak_gib"], r["tok_s"]), fontsize=8, xytext=(4, 4), textcoords="offset points"
            )
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{shape} shape, batch 4 x 2048, r 16")
        ax.set_xlabel("peak GiB (torch.cuda.max_memory_allocated)")
        ax.set_ylabel("tokens/s (counted at the model's forward)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def default_model_root() -> str:
    """Models in shared memory where it has room for the 8B shape in bf16 and NF4, else in /tmp."""
    import shutil

    shm = Path("/dev/shm")
    return str(shm / "qlora-models") if shm.exists() and shutil.disk_usage(shm).free > 30e9 else "/tmp/qlora-models"


def main() -> None:
    """Run the rows (or only plot an existing JSON), then write the table and the plot."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="")
    p.add_argument("--shapes", default="8b,1b")
    p.add_argument("--rows", default=",".join(ROWS), help="names of ROWS; 'SHAPE/name' runs on that shape only")
    p.add_argument("--budget-s", type=float, default=560)
    p.add_argument("--model-root", default=default_model_root())
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: by shape)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: by shape)")
    p.add_argument("--logging-steps", type=int, default=10, help="10 is TRL's default; 1 records every loss")
    p.add_argument("--plot", default="", help="only render the table and plot of this bench.json")
    a = p.parse_args()
    if a.plot:
        results, out = Path(a.plot), Path(a.plot).parent
    else:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        unknown = [r for r in a.rows.split(",") if r.rpartition("/")[2] not in ROWS]
        if unknown:
            sys.exit(f"--rows: unknown {unknown}; known: {', '.join(ROWS)}")
        timing = (a.steps, a.warmup, a.logging_steps)
        results = run_rows(out, a.shapes.split(","), a.rows.split(","), a.budget_s, Path(a.model_root), timing)
    if not results.exists():
        sys.exit("no rows")
    rows = json.loads(results.read_text())
    text = table(rows)
    (out / "bench.md").write_text(text + "\n")
    print(text, flush=True)
    try:
        plot(rows, out / "frontier.png")
    except ImportError as e:
        print(f"no plot: {e}", flush=True)


if __name__ == "__main__":
    main()
