"""Packed against unpacked training on the same full-length rows, through SFTTrainer as a user runs it.

    python benchmarks/packing_bench.py --model-dir DIR --shape 1b --out DIR [--variants ...]

Each variant runs in its own process: random-init Llama of ``--shape`` (made by
``bench_qlora.py make-model``) loaded in 4 bits, ``--rows`` pre-tokenized rows of ``--seq``
tokens, batch 4, TRL's SFTTrainer. Variants:

- ``plugin``: ``args=recipe.sft_config(...)``, ``peft_config=recipe`` (the README's snippet)
- ``plugin-packing``: the same with ``packing=True`` (TRL's best-fit-decreasing packing)
- ``plugin-padding-free``: the same with ``padding_free=True``
- ``trl`` / ``trl-packing``: TRL's own 4-bit path (plain ``LoraConfig``, ``SFTConfig(bf16=True,
  gradient_checkpointing=True, optim="paged_adamw_32bit")``), unpacked and packed

tok/s counts the tokens the model receives in training forwards (a forward pre-hook), over the
steps after ``--warmup``. Writes ``packing.json`` and ``packing.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VARIANTS = ("plugin", "plugin-packing", "plugin-padding-free", "trl", "trl-packing")
# also: plugin-packing-masked (QLORA_PACKED_ATTENTION=0: transformers' block-diagonal mask over the row)


def run_variant(a: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    sys.path.insert(0, str(HERE))
    from bench_models import bnb_config, model_dirs, placeholder_tokenizer, synthetic_batches

    from qlora_plugin import qlora_recipe

    bf16_dir, _ = model_dirs(Path(a.model_dir), a.shape)
    tok = placeholder_tokenizer()
    steps = a.warmup + a.steps
    batches = synthetic_batches(4)
    rows = [batches[i % 4][j][: a.seq].tolist() for i in range(steps) for j in range(4)]
    data = Dataset.from_dict({"input_ids": rows})
    packing = "-packing" in a.variant
    common: dict[str, Any] = dict(
        max_steps=steps,
        per_device_train_batch_size=4,
        logging_steps=10,
        report_to="none",
        save_strategy="no",
        max_length=a.seq,
        seed=0,
        dataloader_num_workers=0,
        packing=packing,
        padding_free=a.variant.endswith("padding-free"),
        disable_tqdm=True,
    )
    if a.variant.endswith("padding-free"):
        common["max_length"] = None  # TRL enforces no length without packing; the rows are a.seq long already
    recipe = qlora_recipe() if a.variant.startswith("plugin") else None
    bnb = bnb_config()
    times: list[float] = []
    tokens: list[int] = []
    reports: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            reports.append(record.getMessage())

    logging.getLogger("qlora_plugin").addHandler(Keep())
    logging.getLogger("qlora_plugin").setLevel(logging.INFO)
    profiled: list[Any] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, *rest: Any, **kwargs: Any) -> None:
            if a.profile and state.global_step == a.warmup + 2:
                profiled.append(torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]))
                profiled[0].__enter__()

        def on_step_end(self, args: Any, state: Any, *rest: Any, **kwargs: Any) -> None:
            torch.cuda.synchronize()
            times.append(time.perf_counter())
            if profiled and state.global_step == a.warmup + 3:
                profiled[0].__exit__(None, None, None)

    with tempfile.TemporaryDirectory() as out:
        if recipe is not None:
            config = recipe.sft_config(output_dir=out, **common)
            peft_config: Any = recipe
            model = recipe.load_model(bf16_dir, device_map={"": 0}, attn_implementation="sdpa")
        else:
            config = SFTConfig(
                output_dir=out, bf16=True, gradient_checkpointing=True, optim="paged_adamw_32bit", **common
            )
            peft_config = LoraConfig(
                r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
            )
            model = AutoModelForCausalLM.from_pretrained(
                bf16_dir, quantization_config=bnb, dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa"
            )
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=data,
            processing_class=tok,
            peft_config=peft_config,
            callbacks=[Clock()],
        )

        def count(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if module.training and ids is not None:
                tokens.append(ids.numel())

        trainer.model.register_forward_pre_hook(count, with_kwargs=True)
        torch.cuda.reset_peak_memory_stats()
        trainer.train()
    timed_steps = len(times) - 1 - a.warmup  # the steps after the warm-up's last one ended
    timed_tokens = sum(tokens[-timed_steps:])
    seconds = times[-1] - times[a.warmup]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    row = dict(
        shape=a.shape,
        variant=a.variant,
        seq=a.seq,
        batch=4,
        steps=timed_steps,
        tok_s=round(timed_tokens / seconds),
        step_s=round(seconds / timed_steps, 4),
        tokens_per_step=timed_tokens // timed_steps,
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        losses=losses,
        attn_implementation=trainer.model.config._attn_implementation,
        plugin_reports=reports,
        gpu=torch.cuda.get_device_name(),
    )
    if profiled:
        events = profiled[0].key_averages()
        cuda = sorted(
            ((e.key, e.device_time_total / 1e3) for e in events if e.device_time_total > 0), key=lambda kv: -kv[1]
        )
        row["profile_top_kernels_ms"] = [(name[:80], round(ms, 2)) for name, ms in cuda[:15]]
        row["profile_gpu_ms"] = round(sum(ms for _, ms in cuda), 1)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--profile", action="store_true", help="profile one step after the warm-up (GPU kernels)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, in a child process
    a = parser.parse_args()
    if a.variant:
        print("ROW " + json.dumps(run_variant(a)), flush=True)
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in a.variants:
        command = [
            sys.executable,
            __file__,
            "--model-dir",
            a.model_dir,
            "--shape",
            a.shape,
            "--seq",
            str(a.seq),
            "--steps",
            str(a.steps),
            "--warmup",
            str(a.warmup),
            "--variant",
            variant,
            *(["--profile"] if a.profile else []),
        ]
        env = {**os.environ, **({"QLORA_PACKED_ATTENTION": "0"} if variant.endswith("-masked") else {})}
        run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        with open(a.out / "packing-logs.txt", "a", encoding="utf-8") as logs:  # one file: a device call returns few
            logs.write(f"==== {variant}\n{run.stdout}{run.stderr}\n")
        found = [line[4:] for line in run.stdout.splitlines() if line.startswith("ROW ")]
        row = json.loads(found[0]) if found else dict(variant=variant, error=(run.stdout + run.stderr)[-1500:])
        rows.append(row)
        print(
            json.dumps(
                {
                    k: row.get(k)
                    for k in (
                        "variant",
                        "tok_s",
                        "step_s",
                        "tokens_per_step",
                        "peak_gib",
                        "attn_implementation",
                        "profile_gpu_ms",
                        "error",
                    )
                }
            ),
            flush=True,
        )
        (a.out / "packing.json").write_text(json.dumps(rows, indent=1))
    base = next((r["tok_s"] for r in rows if r.get("variant") == "plugin" and "tok_s" in r), None)
    lines = ["| variant | tok/s | vs plugin unpacked | step s | tokens/step | peak GiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "tok_s" not in r:
            lines.append(f"| {r['variant']} | error | | | | |")
            continue
        ratio = f"{r['tok_s'] / base:.3f}x" if base else ""
        lines.append(
            f"| {r['variant']} | {r['tok_s']:,} | {ratio} | {r['step_s']} | {r['tokens_per_step']:,} | "
            f"{r['peak_gib']} |"
        )
    (a.out / "packing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
