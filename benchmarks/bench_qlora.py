"""QLoRA training-step benchmark: stock recipes vs qlora-plugin's fast path, one process per variant.

Subcommands (run on a CUDA machine; see benchmarks/run_device.sh):
  all        make the models, run every requested variant in its own process, run the
             CUDA kernel tests and the numerics comparison, write JSON + markdown
  make-model build a random-init Llama of a given shape, save it bf16 and pre-quantized NF4
  run        one variant on one shape; appends one row to a JSON file
  numerics   one recipe for N steps from a saved initial adapter state; per-step losses + grads
  table      render JSON result files as a markdown table

Models are random-init from Llama-3.2-1B / Llama-3.1-8B shapes (no model hub). Data is
synthetic but learnable (a Zipf unigram mixed with a fixed successor map), so the loss moves.
"""

# The work lives in sibling modules (flat files, so that a staged copy of benchmarks/*.py runs):
# bench_config (settings, shapes, variants), bench_measure (timing, memory, profiling),
# bench_models (models, data, per-variant model + optimizer), bench_run, bench_numerics,
# bench_sweep, bench_micro and bench_all (one subcommand each), bench_results (JSON rows, table).

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from bench_all import cmd_all
from bench_config import SHAPES, VARIANTS
from bench_micro import cmd_micro
from bench_models import cmd_make_model
from bench_numerics import cmd_numerics
from bench_results import cmd_table
from bench_run import cmd_run
from bench_sweep import cmd_sweep

HERE = Path(__file__).resolve().parent


def main() -> None:
    """Parse the command line and run the subcommand."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("--shape", choices=SHAPES, required=True)
    m.add_argument("--dir", required=True)
    r = sub.add_parser("run")
    r.add_argument("--shape", choices=SHAPES, required=True)
    r.add_argument("--variant", choices=VARIANTS, required=True)
    r.add_argument("--model-dir", required=True)
    r.add_argument("--json", required=True)
    r.add_argument("--steps", type=int, default=6)
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--plugin", default="", help="JSON overrides of FastPathConfig")
    r.add_argument("--recipe", default="", help="JSON overrides of the recipe (recipe variants)")
    r.add_argument("--optim", default=None)
    r.add_argument("--dropout", type=float, default=None)
    r.add_argument("--logging-steps", type=int, default=10, help="trainer rows; 10 is TRL's default")
    r.add_argument("--tag", default="")
    r.add_argument("--profile", default="")
    r.add_argument("--timeline", default="", help="SFTTrainer rows: GPU idle gaps of 3 profiled steps, to this JSON")
    r.add_argument("--trainer-args", default="", help="JSON overrides of the SFTConfig (SFTTrainer rows)")
    r.add_argument(
        "--trl-metrics",
        choices=("on", "off"),
        default="on",
        help="off: skip TRL's per-step metrics and their read-backs (an experiment, SFTTrainer rows)",
    )
    n = sub.add_parser("numerics")
    n.add_argument("--shape", choices=SHAPES, required=True)
    n.add_argument("--variant", choices=VARIANTS, required=True)
    n.add_argument("--model-dir", required=True)
    n.add_argument("--state-dir", required=True)
    n.add_argument("--steps", type=int, default=30)
    sw = sub.add_parser("sweep")
    sw.add_argument("--shape", choices=SHAPES, required=True)
    sw.add_argument("--path", choices=("stock", "fast"), required=True)
    sw.add_argument("--model-dir", required=True)
    sw.add_argument("--json", required=True)
    sw.add_argument("--max-seq", type=int, default=2048)
    mi = sub.add_parser("micro")
    mi.add_argument("--json", required=True)
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    al = sub.add_parser("all")
    al.add_argument("--out", required=True)
    al.add_argument("--model-root", default="")
    al.add_argument("--shapes", default="1b,8b")
    al.add_argument("--variants", default=";".join(VARIANTS), help="';'-separated entries")
    al.add_argument("--steps", type=int, default=8)
    al.add_argument("--steps-8b", type=int, default=6)
    al.add_argument("--warmup", type=int, default=2)
    al.add_argument("--logging-steps", type=int, default=10, help="trainer rows; 10 is TRL's default")
    al.add_argument("--profile", default="", help="comma list of shape/variant to profile")
    al.add_argument("--numerics", default="", help="comma list of shapes for the 30-step comparison")
    al.add_argument("--numerics-steps", type=int, default=30)
    al.add_argument("--kernel-tests", action="store_true")
    al.add_argument("--sweep", default="", help="comma list of shapes for the memory sweep")
    al.add_argument("--micro", action="store_true")
    al.add_argument("--tests-dir", default=str(HERE.parent / "tests"))
    al.add_argument("--budget-s", type=float, default=540)
    a = p.parse_args()
    if a.cmd == "all" and not a.model_root:
        shm = Path("/dev/shm")
        a.model_root = (
            str(shm / "qlora-models") if shm.exists() and shutil.disk_usage(shm).free > 30e9 else "/tmp/qlora-models"
        )
    {
        "make-model": cmd_make_model,
        "run": cmd_run,
        "micro": cmd_micro,
        "numerics": cmd_numerics,
        "table": cmd_table,
        "all": cmd_all,
        "sweep": cmd_sweep,
    }[a.cmd](a)


if __name__ == "__main__":
    main()
