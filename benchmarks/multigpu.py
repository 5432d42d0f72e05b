#!/usr/bin/env python3
"""Issue 17 on a machine with two GPUs: one GPU, DDP and FSDP2 with the recipe, side by side in one call.

    python benchmarks/multigpu.py --out DIR [--shape llama-3.1-8b] [--variants single-gpu ddp-2gpu fsdp2-2gpu]

Builds a random-init checkpoint of ``--shape`` once (bf16, on GPU 0, saved under
``--model-root``), then runs ``benchmarks/multigpu_job.py`` per variant as a subprocess with
its own time limit: ``single-gpu`` alone on GPU 0 with gradient accumulation 2 (the global
batch of two GPUs), ``ddp-2gpu`` and ``fsdp2-2gpu`` through ``accelerate launch`` with
``configs/accelerate/ddp.yaml`` and ``fsdp2.yaml``. Each row gets ``qlora estimate``'s
per-GPU allocator peak for its shape, batch and strategy. Writes ``multigpu.json`` (rows:
shape, variant, tok_s, peak_gib per GPU, gpus, loss_first, loss_last, losses, estimate_gib,
error) after every variant and ``multigpu.md`` at the end. ``--shape tiny`` runs the logic on
a CPU (float32, gloo). ``--build-in-place`` saves only the config and has every rank build
the model straight into 4 bits, one layer at a time (``benchmarks/build_quantized.py``), as the
70B shape needs: ``--shape llama-3.1-70b --variants fsdp2-2gpu --batch 1 --build-in-place``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VARIANTS = ("single-gpu", "ddp-2gpu", "fsdp2-2gpu")
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=False,
)


def build_checkpoint(shape: str, root: Path, config_only: bool = False) -> Path:
    """A random-init Llama of ``shape`` saved in bf16 under ``root`` (once); only its config with ``config_only``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(HERE))
    from llama_shapes import SHAPES

    target = root / shape
    if (target / "config.json").exists():
        return target
    sizes = TINY if shape == "tiny" else SHAPES[shape]
    config = LlamaConfig(**{**sizes, "max_position_embeddings": 8192})
    config._attn_implementation = "sdpa"
    if config_only:  # the ranks build the weights themselves (--build-in-place)
        config.save_pretrained(target)
        return target
    torch.manual_seed(1234)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target, max_shard_size="4GB")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return target


def estimate_gib(model_dir: Path, seq: int, batch: int, gpus: int, strategy: str, cpu: bool) -> float | None:
    """``qlora estimate``'s allocator peak per GPU, in GiB (None if it fails)."""
    command = [sys.executable, "-m", "qlora_plugin.commands.main", "estimate", str(model_dir), "--seq", str(seq)]
    command += ["--batch", str(batch), "--gpus", str(gpus), "--strategy", strategy, "--json"]
    if cpu:
        command += ["--set", "compute_dtype=float32"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    if done.returncode != 0:
        return None
    return round(json.loads(done.stdout)["allocator_peak"] / 2**30, 3)


def launch_command(variant: str) -> list[str]:
    job = str(HERE / "multigpu_job.py")
    if variant == "single-gpu":
        return [sys.executable, job, "--grad-accum", "2"]
    config = REPO / "configs" / "accelerate" / ("ddp.yaml" if variant == "ddp-2gpu" else "fsdp2.yaml")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    return [*launcher, "--num_processes", "2", job]  # on a CPU the recipe sets use_cpu: gloo, two ranks


def run_variant(variant: str, model_dir: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cpu = args.shape == "tiny"
    out = work / f"{variant}.json"
    command = launch_command(variant) + ["--model-dir", str(model_dir), "--out", str(out)]
    command += ["--steps", str(args.steps), "--seq", str(args.seq), "--batch", str(args.batch)]
    command += ["--warmup", str(args.warmup)]
    if cpu:
        command += ["--compute-dtype", "float32"]
    if args.build_in_place:
        command += ["--build-in-place"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    if variant == "single-gpu":
        env["CUDA_VISIBLE_DEVICES"] = "0"
    started = time.time()
    row: dict[str, Any] = {"shape": args.shape, "variant": variant}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.variant_timeout)
        log = done.stdout + done.stderr
        (work / f"{variant}.log").write_text(log)
        if done.returncode == 0 and out.exists():
            row.update(json.loads(out.read_text()))
        else:
            row["error"] = f"exit {done.returncode}: " + " | ".join(log.strip().splitlines()[-6:])[-1500:]
    except subprocess.TimeoutExpired as expired:
        row["error"] = f"timed out after {args.variant_timeout} s"
        (work / f"{variant}.log").write_text(str(expired.stdout or "") + str(expired.stderr or ""))
    row["seconds"] = round(time.time() - started, 1)
    gpus = 1 if variant == "single-gpu" else 2
    strategy = "fsdp" if variant.startswith("fsdp") else "ddp"
    row["estimate_gib"] = estimate_gib(model_dir, args.seq, args.batch, gpus, strategy, cpu)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| shape | variant | GPUs | tok/s | vs one GPU | peak GiB per GPU (allocated) | estimate GiB | "
        "loss first / last | max loss dev vs one GPU % | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    single = next((r for r in rows if r["variant"] == "single-gpu" and not r.get("error")), None)
    for row in rows:
        if row.get("error"):
            lines.append(
                f"| {row['shape']} | {row['variant']} | | | | | {row.get('estimate_gib')} | | | {row['error'][:300]} |"
            )
            continue
        ratio = f"{row['tok_s'] / single['tok_s']:.2f}x" if single else ""
        dev = ""
        if single and single is not row and len(single["losses"]) == len(row["losses"]):
            dev = f"{max(abs(a - b) / abs(b) for a, b in zip(row['losses'], single['losses'], strict=True)) * 100:.2f}"
        peaks = ", ".join(f"{p:.2f}" for p in row["peak_gib"])
        lines.append(
            f"| {row['shape']} | {row['variant']} | {row['gpus']} | {row['tok_s']:,.0f} | {ratio} | {peaks} | "
            f"{row.get('estimate_gib')} | {row['loss_first']:.4f} / {row['loss_last']:.4f} | {dev} | |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", default="llama-3.1-8b", help="a shape of benchmarks/llama_shapes.py, or tiny (CPU)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--model-root", type=Path, default=Path("/tmp/qlora-multigpu"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--variant-timeout", type=int, default=240, help="seconds each variant may take")
    parser.add_argument(
        "--build-in-place",
        action="store_true",
        help="no checkpoint: each rank builds the shape straight into 4 bits, layer by layer (the 70B shape)",
    )
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.model_root / "runs"
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model_dir = build_checkpoint(args.shape, args.model_root, config_only=args.build_in_place)
    print(f"[{time.time() - started:5.0f} s] checkpoint {model_dir}", flush=True)
    rows: list[dict[str, Any]] = []
    for variant in args.variants:
        rows.append(run_variant(variant, model_dir, args, work))
        row = rows[-1]
        print(
            f"[{time.time() - started:5.0f} s] {variant}: "
            + json.dumps({k: v for k, v in row.items() if k != "losses"}),
            flush=True,
        )
        (args.out / "multigpu.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "multigpu.md").write_text(table(rows))
    print(table(rows))
    return 0 if all(not r.get("error") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
