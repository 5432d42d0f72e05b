"""The ``all`` subcommand: every requested step of a device run, each in its own ``bench_qlora.py``
process (a crash or a leak stays in one row), within a time budget; then the markdown table."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench_numerics import compare_numerics
from bench_results import markdown_table

BENCH_QLORA = Path(__file__).resolve().parent / "bench_qlora.py"


def _sub(args: list[str], log: Path, timeout: float) -> int:
    """Run one ``bench_qlora.py`` subcommand in a fresh process, output appended to ``log``; 124 on timeout."""
    cmd = [sys.executable, str(BENCH_QLORA), *args]
    print("+", " ".join(args), flush=True)
    with log.open("a") as fh:
        fh.write(f"\n+ {' '.join(args)}\n")
        fh.flush()
        try:
            return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            fh.write("TIMEOUT\n")
            return 124


def _tail(log: Path, n: int = 15) -> str:
    """The last ``n`` lines of ``log``, to show what a step printed or why it failed."""
    return "\n".join(log.read_text().splitlines()[-n:])


def cmd_all(a: argparse.Namespace) -> None:
    """Models, variant rows, numerics, sweeps, micro timings and kernel tests into ``--out``, within ``--budget-s``."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    root = Path(a.model_root)
    deadline = time.time() + a.budget_s
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = out / f"bench-{stamp}.json"
    if a.micro:
        rc = _sub(["micro", "--json", str(out / "micro.json")], log, 240)
        print(f"micro rc={rc}\n{_tail(log, 5)}", flush=True)
    for shape in a.shapes.split(","):
        if a.variants or a.numerics or a.sweep:
            rc = _sub(["make-model", "--shape", shape, "--dir", str(root)], log, 600)
            if rc:
                print(f"make-model {shape} failed\n{_tail(log)}", flush=True)
                continue
        for v in [x for x in a.variants.split(";") if x]:
            # entry: [shape/]variant[:{FastPathConfig overrides as JSON}][@tag]
            only, _, rest = v.rpartition("/") if "/" in v.split(":")[0] else ("", "", v)
            if only and only != shape:
                continue
            v = rest
            name, _, extra = v.partition(":")
            plugin, _, tag = extra.partition("@")
            left = deadline - time.time()
            if left < 30:
                print(f"skip {shape}/{v}: budget", flush=True)
                continue
            steps = a.steps_8b if shape == "8b" else a.steps
            slow = name in ("stock-qlora", "bf16-lora") and shape == "8b"
            args = [
                "run",
                "--shape",
                shape,
                "--variant",
                name,
                "--model-dir",
                str(root),
                "--json",
                str(results),
                "--steps",
                str(max(2, steps // 2) if slow else steps),
                "--warmup",
                str(1 if slow else a.warmup),
                "--logging-steps",
                str(a.logging_steps),
            ]
            if plugin:
                args += ["--plugin", plugin]
            if tag:
                args += ["--tag", tag]
            if f"{shape}/{name}" in a.profile.split(","):
                args += ["--profile", str(out / f"profile-{shape}-{tag or name}.txt")]
            rc = _sub(args, log, min(left, 420))
            print(f"  {shape}/{v} rc={rc}\n{_tail(log, 2) if rc == 0 else _tail(log)}", flush=True)
        if shape in a.numerics.split(","):
            sd = out / f"numerics-{shape}"
            sd.mkdir(exist_ok=True)
            for v in ("stock-qlora", "qlora-plugin-numerics"):
                rc = _sub(
                    [
                        "numerics",
                        "--shape",
                        shape,
                        "--variant",
                        v,
                        "--model-dir",
                        str(root),
                        "--state-dir",
                        str(sd),
                        "--steps",
                        str(a.numerics_steps),
                    ],
                    log,
                    max(60, min(deadline - time.time(), 400)),
                )
                print(f"  numerics {shape}/{v} rc={rc}", flush=True)
            try:
                cmp_ = compare_numerics(sd, "stock-qlora", "qlora-plugin-numerics", shape)
                (out / f"numerics-{shape}.json").write_text(json.dumps(cmp_, indent=1))
                print(json.dumps({k: v for k, v in cmp_.items() if not k.startswith("loss_")}), flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"numerics compare failed: {e}", flush=True)
            for f in sd.glob("*.pt"):
                f.unlink()
        if shape in a.sweep.split(","):
            for path in ("fast", "stock"):
                left = deadline - time.time()
                if left < 40:
                    print(f"skip sweep {shape}/{path}: budget", flush=True)
                    continue
                rc = _sub(
                    [
                        "sweep",
                        "--shape",
                        shape,
                        "--path",
                        path,
                        "--model-dir",
                        str(root),
                        "--json",
                        str(out / "memory_sweep.json"),
                    ],
                    log,
                    min(left, 300),
                )
                print(f"  sweep {shape}/{path} rc={rc}\n{_tail(log, 2) if rc == 0 else _tail(log)}", flush=True)
    if a.kernel_tests and deadline - time.time() > 45:
        tests = Path(a.tests_dir) / "test_kernels_cuda.py"
        t = time.time()
        with log.open("a") as fh:
            fh.write("\n+ pytest test_kernels_cuda.py\n")
            fh.flush()
            try:
                rc = subprocess.run(
                    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    timeout=deadline - time.time(),
                ).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        print(f"kernel tests rc={rc} ({time.time() - t:.0f}s)\n{_tail(log, 4)}", flush=True)
    if results.exists():
        table = markdown_table(json.loads(results.read_text()))
        (out / f"bench-{stamp}.md").write_text(table + "\n")
        print(table, flush=True)
