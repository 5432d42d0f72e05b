#!/usr/bin/env python3
"""One multi-GPU benchmark run (issue 17): the recipe through TRL on a random-init Llama.

Run alone (one GPU) or on every rank of ``accelerate launch``::

    python benchmarks/multigpu_job.py --model-dir DIR --out ROW.json --grad-accum 2
    accelerate launch --config_file configs/accelerate/fsdp2.yaml benchmarks/multigpu_job.py \
        --model-dir DIR --out ROW.json [--build-in-place] [--save-adapter]

Each rank trains ``--steps`` steps of ``--batch`` x ``--seq`` synthetic tokens with
``SFTTrainer(model=..., args=recipe.sft_config(...), peft_config=recipe)``: the checkpoint in
``--model-dir`` given by name, as a user would (the recipe loads it in 4 bits on the rank's GPU),
or with ``--build-in-place`` the model of its config (or of ``--shape``) built straight into
4 bits on the rank's device, one layer at a time (``benchmarks/build_quantized.py``: the 70B
shape). LoRA dropout is 0, so one GPU with gradient accumulation and N ranks compute the same
update from the same global batch.

Rank 0 writes the row: logged losses; tokens per second over the steps after ``--warmup``
(tokens the model really received, counted by a forward pre-hook on every rank and summed);
per rank the peak allocated and reserved memory while loading, over the whole ``train()``
(FSDP's sharding included) and over the timed steps; under FSDP or DeepSpeed ZeRO-3, each
rank's share of the packed 4-bit elements once the engine has partitioned them, and whether
every 4-bit layer computed with the exact packed bytes it had before training (both engines
hand each layer an all-gathered copy); versions and GPU. ``--save-adapter`` then saves the
adapter through the trainer and checks it is a whole PEFT adapter. Each rank keeps
``ROW.rank<N>.progress.json`` current (phase, seconds, memory, last loss), so a run cut short
still says how far it got; a failing rank writes ``ROW.rank<N>.error.json`` with the exception.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GIB = 2**30
TINY: dict[str, Any] = dict(  # the CPU check's shape: two layers, untied head
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=False,
)
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets")


def shape_config(shape: str) -> Any:
    """A ``LlamaConfig`` of ``shape``: ``tiny`` or a shape of ``benchmarks/llama_shapes.py`` (SDPA attention)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from llama_shapes import SHAPES, llama_config

    if shape == "tiny":
        from transformers import LlamaConfig

        config = LlamaConfig(**TINY, max_position_embeddings=8192)
        config._attn_implementation = "sdpa"
        return config
    if shape not in SHAPES:
        raise SystemExit(f"--shape {shape!r}: not a shape; use tiny or one of {sorted(SHAPES)}")
    return llama_config(shape, max_position_embeddings=8192)


# --recompute -> the recipe's gradient_checkpointing
RECOMPUTE = {"none": False, "full": True, "offload": "offload"}


def job_recipe(compute_dtype: str = "auto", learning_rate: float | None = None, recompute: str = "full") -> Any:
    """The recipe every variant trains, and the one ``qlora estimate`` is asked about.

    The recipe's defaults, except LoRA dropout 0 (one GPU with accumulation and N ranks then
    compute the same update), a constant learning rate (no warmup to blur the losses) and, if
    given, ``learning_rate``; ``recompute`` picks ``gradient_checkpointing`` (:data:`RECOMPUTE`).
    """
    from qlora_plugin import qlora_recipe

    changes: dict[str, Any] = {"lora_dropout": 0.0, "lr_scheduler_type": "constant", "warmup_ratio": 0.0}
    if learning_rate is not None:
        changes["learning_rate"] = learning_rate
    return qlora_recipe(compute_dtype=compute_dtype, gradient_checkpointing=RECOMPUTE[recompute], **changes)


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


def byte_checksum(tensor: Any) -> tuple[int, int]:
    """Two sums over ``tensor``'s bytes, plain and position-weighted (int64, wrapping): a changed byte shows.

    Computed where the tensor lives, in chunks, so a 70B layer needs no host copy.
    """
    import torch

    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    plain = weighted = 0
    for chunk in data.split(1 << 24):
        values = chunk.to(torch.int64)
        positions = torch.arange(values.numel(), device=values.device, dtype=torch.int64) % 65521 + 1
        plain += int(values.sum())
        weighted += int((values * positions).sum())
    return plain, weighted


class WeightWatch:
    """Checks each 4-bit layer's first forward against its packed bytes before training.

    FSDP2 and DeepSpeed ZeRO-3 train each layer with an all-gathered copy of its shards; a
    bitsandbytes report (issue 1945) says bf16-stored NF4 bytes that read as NaN can come back
    altered, and a random-init model's loss would not show it. The check runs when the layer's
    forward has finished (a forward hook, registered before the engine's own), while the weight
    it computed with is still gathered, whenever the engine gathered it. Used under those
    engines only: elsewhere the weights are never copied, and hooks on the decoder layers would
    turn the fast path's CUDA graphs off. A check that cannot run is counted in ``failed``
    (with its first message), never raised.
    """

    def __init__(self, model: Any) -> None:
        import bitsandbytes as bnb
        import torch

        self.before: dict[str, tuple[int, int]] = {}
        self.handles: dict[str, Any] = {}
        self.changed: list[str] = []
        self.failed: list[str] = []
        self.nan_patterns = 0  # packed elements that read as NaN in a float storage dtype
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = module.weight.data
                self.before[name] = byte_checksum(weight)
                if weight.is_floating_point():
                    self.nan_patterns += int(torch.isnan(weight).sum())
                self.handles[name] = module.register_forward_hook(partial(self._first_forward, name))

    def _first_forward(self, name: str, module: Any, _args: tuple[Any, ...], _output: Any) -> None:
        self.handles.pop(name).remove()
        try:
            same = byte_checksum(module.weight.data) == self.before[name]
        except Exception as error:  # a measurement must not stop the training it measures
            self.failed.append(f"{name}: {type(error).__name__}: {error}"[:300])
            return
        if not same:
            self.changed.append(name)

    @property
    def checked(self) -> int:
        return len(self.before) - len(self.handles) - len(self.failed)


def held_4bit(model: Any) -> tuple[int, int, int, int, int]:
    """This rank's resident packed 4-bit elements, the whole model's, and counts of its 4-bit layers.

    Returns (resident, full, partitioned layers, layers, persistent layers). Reads DeepSpeed
    ZeRO-3's partition (``ds_tensor`` of ``ds_numel``; a "persistent" parameter, one below
    ``stage3_param_persistence_threshold``, also stays gathered whole on every rank, so it counts
    whole as well) or FSDP2's local shard of a DTensor; any other weight is held whole.
    """
    import bitsandbytes as bnb

    resident = full = split = layers = persistent = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = module.weight
        if hasattr(weight, "ds_numel"):
            whole, mine = int(weight.ds_numel), int(weight.ds_tensor.numel())
            split += mine < whole
            if getattr(weight, "ds_persist", False):
                mine, persistent = mine + whole, persistent + 1
        elif hasattr(weight, "to_local"):
            whole, mine = weight.numel(), weight.to_local().numel()
            split += mine < whole
        else:
            whole = mine = weight.numel()
        resident, full, layers = resident + mine, full + whole, layers + 1
    return resident, full, split, layers, persistent


class Progress:
    """This rank's last phase, written to ``ROW.rank<N>.progress.json`` at each step of the run."""

    def __init__(self, out: Path) -> None:
        self.rank = int(os.environ.get("RANK", "0"))
        self.path = out.with_name(f"{out.stem}.rank{self.rank}.progress.json")
        self.started = time.perf_counter()

    def __call__(self, phase: str, **extra: Any) -> None:
        import torch

        record: dict[str, Any] = {
            "rank": self.rank,
            "phase": phase,
            "seconds": round(time.perf_counter() - self.started, 1),
        }
        if torch.cuda.is_available():
            record["allocated_gib"] = round(torch.cuda.memory_allocated() / GIB, 3)
            record["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
        self.path.write_text(json.dumps(record | extra) + "\n")


def versions() -> dict[str, str]:
    """The installed versions of the packages the run depends on, and CUDA's."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    import torch

    found["cuda"] = str(torch.version.cuda)
    return found


def check_adapter(directory: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Whether ``directory`` holds a whole PEFT adapter: every LoRA tensor at its full (unsharded) shape, finite."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(directory / "adapter_model.safetensors"))
    shapes = {name: tuple(tensor.shape) for name, tensor in saved.items()}
    return {
        "tensors": len(saved),
        "expected": len(expected),
        "shapes_match": shapes == expected,
        "finite": all(bool(torch.isfinite(tensor.float()).all()) for tensor in saved.values()),
        "lora_B_trained": any(bool(t.abs().sum() > 0) for n, t in saved.items() if "lora_B" in n),
        "config": (directory / "adapter_config.json").is_file(),
        "megabytes": round((directory / "adapter_model.safetensors").stat().st_size / 2**20, 1),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="a checkpoint (or, with --build-in-place, a config.json)")
    parser.add_argument("--shape", help="with --build-in-place and no --model-dir: tiny or a llama_shapes shape")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank per micro-batch")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--compute-dtype", default="auto", help="the recipe's compute_dtype (auto: bf16 on CUDA)")
    parser.add_argument("--learning-rate", type=float, help="instead of the recipe's (a tiny model needs more to move)")
    parser.add_argument(
        "--build-in-place",
        action="store_true",
        help="build the model straight into 4 bits on this rank's device, layer by layer "
        "(benchmarks/build_quantized.py), instead of loading weights from --model-dir",
    )
    parser.add_argument(
        "--recompute",
        choices=sorted(RECOMPUTE),
        default="full",
        help="the recipe's gradient_checkpointing: none (False), full (True, the default) or offload",
    )
    parser.add_argument("--save-adapter", action="store_true", help="after the row: save the adapter and check it")
    parser.add_argument(
        "--zero3-persistence-threshold",
        type=int,
        help="under DeepSpeed: its stage3_param_persistence_threshold (parameters of at most this many elements "
        "stay whole on every rank; DeepSpeed's default 1e5 keeps every weight of the tiny shape whole)",
    )
    args = parser.parse_args(argv)
    if args.model_dir is None and not (args.build_in_place and args.shape):
        parser.error("pass --model-dir, or --build-in-place with --shape")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must be at least 0 and below --steps {args.steps}")
    return args


def train(args: argparse.Namespace) -> None:
    """Train, measure and (rank 0) write the row; see the module docstring."""
    import torch
    import torch.distributed as dist
    from datasets import Dataset
    from transformers import AutoConfig, TrainerCallback
    from trl import SFTTrainer

    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from bench_models import placeholder_tokenizer

    from qlora_plugin.build.context import context_of
    from qlora_plugin.build.lora_layers import context_for

    started = time.perf_counter()
    progress = Progress(args.out)
    cuda = torch.cuda.is_available()
    recipe = job_recipe(args.compute_dtype, args.learning_rate, args.recompute)
    settings = recipe.sft_config(
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
    plugin = getattr(settings, "deepspeed_plugin", None)  # accelerate's, under a DeepSpeed launch
    if plugin is not None and args.zero3_persistence_threshold is not None:
        zero = plugin.deepspeed_config.setdefault("zero_optimization", {})
        zero["stage3_param_persistence_threshold"] = args.zero3_persistence_threshold
    world = int(settings.world_size)
    config = AutoConfig.from_pretrained(args.model_dir) if args.model_dir else shape_config(args.shape)
    rows = args.steps * args.grad_accum * args.batch * world
    data = Dataset.from_dict({"input_ids": synthetic_rows(rows, args.seq, config.vocab_size)})
    tokens = [0]
    stamps: dict[str, float] = {}
    held: list[int] = []  # held_4bit at the first step, once the engine has partitioned the model
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def count(_module: Any, positional: tuple[Any, ...], keywords: dict[str, Any]) -> None:
        ids = keywords.get("input_ids", positional[0] if positional else None)
        if ids is not None and torch.is_grad_enabled() and "start" in stamps and "end" not in stamps:
            tokens[0] += ids.numel()

    class Clock(TrainerCallback):
        """Starts the clock (and the steady-state memory peak) at step ``--warmup``; stops it after the last."""

        def on_step_begin(self, _args: Any, state: Any, *rest: Any, **kw: Any) -> None:
            if not held and kw.get("model") is not None:
                held.extend(held_4bit(kw["model"]))
            if state.global_step == args.warmup and "start" not in stamps:
                sync()
                if cuda:
                    stamps["prepare_peak"] = torch.cuda.max_memory_allocated()
                    stamps["prepare_reserved"] = torch.cuda.max_memory_reserved()
                    torch.cuda.reset_peak_memory_stats()
                stamps["start"] = time.perf_counter()

        def on_step_end(self, _args: Any, state: Any, *rest: Any, **kw: Any) -> None:
            if state.global_step >= args.steps and "end" not in stamps:
                sync()
                stamps["end"] = time.perf_counter()
            losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
            progress(f"step {state.global_step}", loss=losses[-1] if losses else None)

    model: Any = str(args.model_dir)
    if args.build_in_place:
        from build_quantized import build_quantized

        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu"
        progress("building")
        model = build_quantized(config, recipe, device).train()
        if cuda:
            torch.cuda.empty_cache()
    built = time.perf_counter()
    progress("trainer")
    trainer = SFTTrainer(
        model=model,
        args=settings,
        train_dataset=data,
        processing_class=placeholder_tokenizer(),
        peft_config=recipe,
        callbacks=[Clock()],
    )
    lora_shapes = {
        name.replace(".default", ""): tuple(param.shape)
        for name, param in trainer.model.named_parameters()
        if "lora_" in name and param.requires_grad
    }
    storage = next((str(p.dtype) for n, p in trainer.model.named_parameters() if type(p).__name__ == "Params4bit"), "")
    load_peak = torch.cuda.max_memory_allocated() / GIB if cuda else 0.0  # before the checksums' scratch
    run = context_of(trainer.model) or context_for(recipe)  # the run the model was built in
    engine = run.sharding
    watch = WeightWatch(trainer.model) if engine else None
    trainer.model.register_forward_pre_hook(count, with_kwargs=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    loaded = time.perf_counter()
    progress("train", load_peak_gib=round(load_peak, 3))
    trainer.train()
    trained = time.perf_counter()
    progress("trained")
    losses = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    steady = torch.cuda.max_memory_allocated() if cuda else 0
    steady_reserved = torch.cuda.max_memory_reserved() if cuda else 0
    mine = torch.tensor(
        [
            float(tokens[0]),
            load_peak,
            max(stamps.get("prepare_peak", 0), steady) / GIB,
            max(stamps.get("prepare_reserved", 0), steady_reserved) / GIB,
            steady / GIB,
            float(watch.checked if watch else -1),
            float(len(watch.changed) if watch else -1),
            float(watch.nan_patterns if watch else -1),
            *[float(v) for v in (held or [-1, -1, -1, -1, -1])],
        ],
        dtype=torch.float64,
        device=trainer.args.device,
    )
    gathered = [mine]
    if dist.is_available() and dist.is_initialized():
        gathered = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
    ranks = [[float(v) for v in g.tolist()] for g in gathered]
    if not trainer.is_world_process_zero():
        if args.save_adapter:
            trainer.save_model(str(args.out.parent / f"{args.out.stem}-adapter"))
        return
    row: dict[str, Any] = {
        "gpus": world,
        "tok_s": sum(r[0] for r in ranks) / (stamps["end"] - stamps["start"]),
        "timed_steps": args.steps - args.warmup,
        "peak_gib": [round(r[2], 3) for r in ranks],
        "reserved_gib": [round(r[3], 3) for r in ranks],
        "steady_peak_gib": [round(r[4], 3) for r in ranks],
        "load_peak_gib": [round(r[1], 3) for r in ranks],
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "losses": losses,
        "batch_per_gpu": args.batch,
        "grad_accum": args.grad_accum,
        "seq": args.seq,
        "steps": args.steps,
        "fsdp": engine == "FSDP",  # from the config or, under accelerate launch, the launch
        "zero3": engine == "DeepSpeed ZeRO-3",
        "sharding": engine,
        "fast_path": run.fast_path_on(),
        "optimizer": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
        "quant_storage": storage,
        "built_in_place": args.build_in_place,
        "recompute": args.recompute,
    }
    if engine and ranks[0][11] > 0:  # each rank's share of the packed 4-bit elements, once partitioned
        row |= {
            "local_4bit_fraction": [round(r[8] / r[9], 4) for r in ranks],
            "partitioned_4bit_layers": [int(r[10]) for r in ranks],
            "persistent_4bit_layers": [int(r[12]) for r in ranks],  # ZeRO-3 keeps these whole too
            "layers_4bit": int(ranks[0][11]),
        }
    if watch:  # under FSDP or ZeRO-3: each rank's 4-bit layers, checked at their first sharded forward
        row |= {
            "weights_checked": [int(r[5]) for r in ranks],
            "weights_changed": [int(r[6]) for r in ranks],
            "weights_changed_names": watch.changed[:5],
            "weights_check_failed": watch.failed[:3],
            "nan_pattern_elements": int(ranks[0][7]),
        }
    row |= {
        "seconds": {
            "build": round(built - started, 1),  # settings, data and (--build-in-place) the model
            "load": round(loaded - started, 1),  # ... and the trainer with its PEFT model
            "train": round(trained - loaded, 1),
        },
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": versions(),
    }
    args.out.write_text(json.dumps(row, indent=1) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k not in ("losses", "versions")}), flush=True)
    if args.save_adapter:  # after the row is written: a crash here still leaves the measurements
        adapter = args.out.parent / f"{args.out.stem}-adapter"
        saving = time.perf_counter()
        try:
            trainer.save_model(str(adapter))
            row["adapter"] = check_adapter(adapter, lora_shapes) | {"seconds": round(time.perf_counter() - saving, 1)}
        except Exception as error:  # recorded, not raised: the training row stands
            row["adapter"] = {"error": f"{type(error).__name__}: {error}"[:1000]}
        args.out.write_text(json.dumps(row, indent=1) + "\n")
        print(json.dumps({"adapter": row["adapter"]}), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    try:
        train(args)
    except BaseException as error:  # the orchestrator reads the exact message from this file
        rank = os.environ.get("RANK", "0")
        record = {
            "rank": int(rank),
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc()[-4000:],
        }
        args.out.with_name(f"{args.out.stem}.rank{rank}.error.json").write_text(json.dumps(record, indent=1) + "\n")
        raise


if __name__ == "__main__":
    main()
