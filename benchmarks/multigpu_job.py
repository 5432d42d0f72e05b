#!/usr/bin/env python3
"""One multi-GPU benchmark run (issue 17): the recipe through TRL on a random-init Llama checkpoint.

Run alone (one GPU) or on every rank of ``accelerate launch``::

    python benchmarks/multigpu_job.py --model-dir DIR --out ROW.json --grad-accum 2
    accelerate launch --config_file configs/accelerate/ddp.yaml benchmarks/multigpu_job.py \
        --model-dir DIR --out ROW.json

Each rank trains ``--steps`` steps of ``--batch`` x ``--seq`` synthetic tokens with
``SFTTrainer(model=DIR, args=recipe.sft_config(...), peft_config=recipe)``, the model given
by name as a user would (the recipe loads it in 4 bits on the rank's GPU), or with
``--build-in-place`` built from its config straight into 4 bits on the rank's device, one
layer at a time (``benchmarks/build_quantized.py``: the 70B shape). LoRA dropout is 0,
so one GPU with gradient accumulation and N ranks compute the same update from the same
global batch. Rank 0 writes the row: logged losses, tokens per second over the steps after
``--warmup`` (tokens the model really received, counted by a forward pre-hook on every
rank and summed), each rank's peak allocated and reserved memory, and the world size.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def synthetic_rows(rows: int, seq: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``rows`` token rows of length ``seq``: a fixed successor half the time, so the loss can fall."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    successor = torch.randperm(vocab, generator=generator)
    tokens = torch.randint(0, vocab, (rows, seq), generator=generator)
    follow = torch.rand(rows, seq, generator=generator) < 0.5
    for t in range(1, seq):
        tokens[:, t] = torch.where(follow[:, t], successor[tokens[:, t - 1]], tokens[:, t])
    return tokens.tolist()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank per micro-batch")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--compute-dtype", default="auto", help="the recipe's compute_dtype (auto: bf16 on CUDA)")
    parser.add_argument(
        "--build-in-place",
        action="store_true",
        help="build the model of --model-dir's config.json straight into 4 bits on this rank's device, "
        "layer by layer (benchmarks/build_quantized.py), instead of loading weights from --model-dir",
    )
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist
    from bench_models import placeholder_tokenizer  # this script's folder, first on sys.path
    from datasets import Dataset
    from transformers import AutoConfig, TrainerCallback
    from trl import SFTTrainer

    from qlora_plugin import qlora_recipe
    from qlora_plugin.core.distributed import fsdp_in_effect

    recipe = qlora_recipe(
        compute_dtype=args.compute_dtype,
        lora_dropout=0.0,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
    )
    config = recipe.sft_config(
        output_dir=str(args.out.parent / f"{args.out.stem}-trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=args.seq,
        packing=False,
        seed=0,
        data_seed=0,
        dataset_kwargs={"skip_prepare_dataset": True},
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    world = int(config.world_size)
    vocab = AutoConfig.from_pretrained(args.model_dir).vocab_size
    rows = args.steps * args.grad_accum * args.batch * world
    data = Dataset.from_dict({"input_ids": synthetic_rows(rows, args.seq, vocab)})
    tokens = [0]
    stamps: dict[str, float] = {}

    def count(_module: Any, positional: tuple[Any, ...], keywords: dict[str, Any]) -> None:
        ids = keywords.get("input_ids", positional[0] if positional else None)
        if ids is not None and torch.is_grad_enabled() and stamps.get("start") is not None:
            tokens[0] += ids.numel()

    class Clock(TrainerCallback):
        def on_step_begin(self, _args: Any, state: Any, *rest: Any, **kw: Any) -> None:
            if state.global_step == args.warmup:
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                stamps["start"] = time.perf_counter()

        def on_train_end(self, *rest: Any, **kw: Any) -> None:
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            stamps["end"] = time.perf_counter()

    model: Any = str(args.model_dir)
    if args.build_in_place:
        import os
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from build_quantized import build_quantized

        rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{rank}" if torch.cuda.is_available() else "cpu"
        model = build_quantized(AutoConfig.from_pretrained(args.model_dir), recipe, device).train()
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=placeholder_tokenizer(),
        peft_config=recipe,
        callbacks=[Clock()],
    )
    trainer.model.register_forward_pre_hook(count, with_kwargs=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    seconds = stamps["end"] - stamps["start"]
    mine = torch.tensor(
        [
            float(tokens[0]),
            torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
            torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0,
        ],
        device=trainer.args.device,
    )
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    if dist.is_available() and dist.is_initialized():
        dist.all_gather(gathered, mine)
    else:
        gathered = [mine]
    if trainer.is_world_process_zero():
        row = {
            "gpus": world,
            "tok_s": sum(float(g[0]) for g in gathered) / seconds,
            "timed_steps": args.steps - args.warmup,
            "peak_gib": [round(float(g[1]), 3) for g in gathered],
            "reserved_gib": [round(float(g[2]), 3) for g in gathered],
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "losses": losses,
            "batch_per_gpu": args.batch,
            "grad_accum": args.grad_accum,
            "seq": args.seq,
            "fsdp": fsdp_in_effect(recipe),  # from the config or, under accelerate launch, the launch
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        }
        args.out.write_text(json.dumps(row, indent=1) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)


if __name__ == "__main__":
    main()
