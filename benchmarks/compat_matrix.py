"""The compatibility matrix on a GPU: every cell of tests/compat_cells.py (and the GPU-only ones).

    python benchmarks/compat_matrix.py --out DIR [--only NAME ...] [--skip axolotl] [--compute-dtype float32]

Each cell trains 30 steps with the plugin and with TRL's own 4-bit path (same arguments,
seed and data; a plain ``LoraConfig``), or for Axolotl cells, with the plugin and with the
plugin-free ``qlora_expanded.yml`` it writes. Writes ``compat.json`` (one row per cell:
``cell``, ``status`` fast | fallback | crash, ``reason``, ``max_loss_dev_pct``, ``tok_s``, and
the package versions) and ``compat.md``. ``--compute-dtype float32`` runs both paths in float32
(bf16 by default): equal maths shows there, apart from bf16 rounding. ``--noise-floor`` also runs
TRL's path from its initial adapter nudged by a fraction of a bf16 rounding step (the row's
``noise_floor_pct``): how far bf16 alone moves that path in the same steps.
``--fp32-adapter-baseline`` also runs TRL's path with its adapters kept in float32
(``fp32_adapters_dev_pct``): TRL 1.9 rounds a quantized model's trainable weights to bf16
when it builds the trainer, the plugin keeps float32 master weights. Models: tiny random
configs of each family at a GPU-sized width (hidden 512, 4 layers) with a word-level tokenizer; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = Path(os.environ.get("QLORA_TESTS_DIR", HERE.parent / "tests"))
sys.path.insert(0, str(TESTS))

from compat_cells import Cell, Result, Setting, run_cell  # noqa: E402

GPU_SIZES = dict(
    hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4
)
PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "liger-kernel", "axolotl")


def gpu_cells() -> list[Cell]:
    """The CPU matrix's cells, plus the ones only a GPU has (Liger, Axolotl's kernels)."""
    from test_compat_matrix import CELLS

    liger = [
        Cell("sft-own-config-liger", args={"use_liger_kernel": True}),
        Cell("sft-recipe-config-liger-off", recipe_args=True, args={"use_liger_kernel": False}),
        Cell("sft-recipe-config-speed-point", recipe_args=True, recipe={"gradient_checkpointing": False}),
        Cell("sft-recipe-config-offload", recipe_args=True, recipe={"gradient_checkpointing": "offload"}),
        Cell("sft-recipe-config-packing", recipe_args=True, args={"packing": True}),
        Cell("sft-recipe-config-dropout", recipe_args=True, recipe={"lora_dropout": 0.05}, compare=False),
    ]
    axolotl = [
        Cell("axolotl-plugin", trainer="axolotl"),
        Cell(
            "axolotl-lora-kernels",
            trainer="axolotl",
            axolotl={"lora_qkv_kernel": True, "lora_o_kernel": True, "lora_mlp_kernel": True},
        ),
        Cell("axolotl-sample-packing", trainer="axolotl", axolotl={"sample_packing": True}),
        Cell("axolotl-dpo", trainer="axolotl", data="preference", axolotl={"rl": "dpo"}, compare=False),
    ]
    return [*CELLS, *liger, *axolotl]


@functools.cache
def model_dir(family: str, root: Path) -> Path:
    from compat_models import save_tiny_family

    return save_tiny_family(family, root / "models" / family, dtype="bfloat16", **GPU_SIZES)


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| cell | status | max loss dev % | vs TRL's path with float32 adapters % "
        "| TRL's path vs itself from a nudged start % | tok/s (plugin / TRL's path) | reason |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        dev = "—" if row["max_loss_dev_pct"] is None else f"{row['max_loss_dev_pct']:.3f}"
        speed = "—" if not row["tok_s"] else f"{row['tok_s']:,.0f}"
        if row.get("baseline_tok_s"):
            speed += f" / {row['baseline_tok_s']:,.0f}"
        reason = (row["reason"] or "").splitlines()[0][:160] if row["reason"] else ""
        floor = "—" if row.get("noise_floor_pct") is None else f"{row['noise_floor_pct']:.3f}"
        kept = "—" if row.get("fp32_adapters_dev_pct") is None else f"{row['fp32_adapters_dev_pct']:.3f}"
        lines.append(f"| {row['cell']} | {row['status']} | {dev} | {kept} | {floor} | {speed} | {reason} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", default=None, help="run only these cells (names or name prefixes)")
    parser.add_argument("--skip", nargs="*", default=[], help="leave out cells whose name starts with one of these")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=2e-4,
        help="the recipe's default; bf16 runs two summation orders apart diverge faster at larger rates",
    )
    parser.add_argument(
        "--noise-floor",
        action="store_true",
        help="also run TRL's path from a start nudged below a bf16 rounding step: how far it drifts from itself",
    )
    parser.add_argument(
        "--fp32-adapter-baseline",
        action="store_true",
        help="also compare with TRL's path keeping its adapters in float32 (TRL rounds them to bf16)",
    )
    parser.add_argument(
        "--compute-dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="both paths' compute dtype; float32 separates the maths from bf16 rounding",
    )
    parser.add_argument("--label", default="", help="a name for this package set (e.g. pinned, newest)")
    args = parser.parse_args()

    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("QLORA_COMPAT_WORK", "/tmp/qlora-compat"))
    setting = Setting(
        workdir=work,
        device="cuda" if torch.cuda.is_available() else "cpu",
        steps=args.steps,
        batch=4,
        length=128,
        compute_dtype=args.compute_dtype,
        learning_rate=args.learning_rate,
        model_factory=model_dir,
        noise_floor=args.noise_floor,
        fp32_adapter_baseline=args.fp32_adapter_baseline,
    )
    cells = [
        c
        for c in gpu_cells()
        if (not args.only or any(c.name.startswith(o) for o in args.only))
        and not any(c.name.startswith(s) for s in args.skip)
    ]
    rows: list[dict[str, Any]] = []
    found = versions()
    started = time.time()
    for cell in cells:
        t0 = time.time()
        result: Result = run_cell(cell, setting)
        row = {
            **result.to_dict(),
            "expected": cell.expect,
            "seconds": round(time.time() - t0, 1),
            "set": args.label,
            "compute_dtype": args.compute_dtype,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "versions": found,
        }
        rows.append(row)
        print(
            f"{cell.name}: {result.status} dev={result.max_loss_dev_pct} fp32-adapters={result.fp32_adapters_dev_pct} "
            f"floor={result.noise_floor_pct} "
            f"tok/s={result.tok_s} "
            f"({row['seconds']} s) {result.reason.splitlines()[0][:200] if result.reason else ''}",
            flush=True,
        )
        (args.out / "compat.json").write_text(json.dumps(rows, indent=1))
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    (args.out / "compat.md").write_text(
        f"Package set {args.label}: " + ", ".join(f"{k} {v}" for k, v in found.items()) + f"\n\n{table(rows)}"
    )
    print(table(rows))
    print(f"{len(rows)} cells in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
