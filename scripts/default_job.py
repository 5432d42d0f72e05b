#!/usr/bin/env python3
"""The default job (``make train``): train it with Axolotl, score it on held-out data, say where it is.

Axolotl's trainer runs in this process on ``configs/qlora-smollm2.yml`` (what
``axolotl train configs/qlora-smollm2.yml --launcher python`` runs). The trained model,
still in memory, is then scored on the 300 held-out snippets with its adapter and without
it, and the job ends with three lines (accuracy before, after, where the adapter is) and
the commands that come next. ``--job tiny`` does the same for the embedded tiny job
(``make train-tiny``, ``configs/qlora.yml``).

The console keeps warnings, errors, the plugin's lines, the progress bars and the losses.
Axolotl's notes and its 400-line config go only to ``OUTPUT_DIR/debug.log`` (Axolotl's full
log), which one line names. Third-party warnings that every CPU run raises, each listed in
:data:`EXPECTED_ON_CPU` with the reason, are dropped where they are raised; nothing else is.

Usage, from the repository root (after ``scripts/prepare_real_job.py`` for the default job)::

    python scripts/default_job.py [--job default|tiny] [--output-dir DIR] [--dataset-prepared-path DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
PLUGIN_LOGGER = "axolotl.integrations.qlora_plugin"


@dataclass(frozen=True)
class Expected:
    """A third-party warning every CPU run raises: where it comes from, how it starts, and why it is harmless."""

    source: str  # a logger name, or "warnings" for a Python warning
    pattern: str  # a regular expression matched at the start of the message
    why: str


EXPECTED_ON_CPU = (
    Expected("torchao", r"Failed to load .*\.so", "torchao's CUDA extensions, which a CPU run never calls"),
    Expected(
        "torch.utils._pytree",
        r"<enum '\w+'> is an Enum subclass and is now natively supported",
        "a deprecation inside torchao's import, not in anything this job calls",
    ),
    Expected(
        "warnings",
        r"Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
        "bitsandbytes asks the kernel hub for an optional CPU kernel; offline, it has none",
    ),
    Expected(
        "kernels.hf_hub",  # the same message where the kernels package logs it (newer releases: Python 3.12 set)
        r"Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
        "bitsandbytes asks the kernel hub for an optional CPU kernel; offline, it has none",
    ),
    Expected(
        "bitsandbytes.backends.cpu.ops",
        r"Failed to load CPU gemm_4bit_forward from kernels-community",
        "the same optional kernel; bitsandbytes computes the 4-bit layers with its own CPU code instead",
    ),
    Expected(
        "warnings",
        r"'pin_memory' argument is set as true but no accelerator is found",
        "pinned host memory only speeds up copies to a GPU",
    ),
    Expected(
        "warnings",
        r"Paged optimizers are not supported on CPU",
        "paged AdamW keeps its states in ordinary memory on a CPU; the update is the same",
    ),
    Expected(
        "axolotl.utils.data.sft",
        r"Processing datasets during training can lead to VRAM instability",
        "a CPU has no VRAM; the data takes seconds to prepare",
    ),
)


class _DropExpected(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``patterns``."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


class _ConsoleKeeps(logging.Filter):
    """On the console: warnings and errors, and the plugin's lines; the rest goes to the debug log only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.startswith(PLUGIN_LOGGER)


def drop_expected_warnings() -> None:
    """Drop :data:`EXPECTED_ON_CPU` where each is raised; to be called before torch and Axolotl are imported."""
    by_logger: dict[str, list[str]] = {}
    for expected in EXPECTED_ON_CPU:
        if expected.source == "warnings":
            warnings.filterwarnings("ignore", message=expected.pattern)
        else:
            by_logger.setdefault(expected.source, []).append(expected.pattern)
    for name, patterns in by_logger.items():
        logging.getLogger(name).addFilter(_DropExpected(patterns))


def quiet_console() -> None:
    """Axolotl's console handlers (set up when ``axolotl.cli`` is imported) show what :class:`_ConsoleKeeps` keeps."""
    import axolotl.cli  # noqa: F401  (configures Axolotl's logging)

    consoles = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    for logger in (logging.getLogger(), logging.getLogger("axolotl")):
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in consoles:
                handler.addFilter(_ConsoleKeeps())


@dataclass(frozen=True)
class Job:
    """One job: its config, how its held-out data is scored, and how to ask the trained model."""

    config: str
    data: str
    score: Callable[[Any, Any], dict[str, Any]]
    ask: list[str]
    score_threads: int | None = None  # the tiny model's many small ops: one thread, or they stall on a busy CPU


def score_sentiment(model: Any, tokenizer: Any) -> dict[str, Any]:
    import evaluate_sentiment as ev

    rows = ev.read_rows(ev.DEFAULT_TEST)
    return {"rows": len(rows), "accuracy": ev.evaluate(model, tokenizer, rows, batch_size=32)["label_scoring"]}


def score_headlines(model: Any, tokenizer: Any) -> dict[str, Any]:
    import evaluate_headlines as ev

    rows = ev.read_rows(ev.DEFAULT_TEST)
    return {"rows": len(rows), "accuracy": ev.evaluate(model, tokenizer, rows, greedy=False)["label_scoring"]}


JOBS = {
    "default": Job(
        "configs/qlora-smollm2.yml",
        "held-out snippets",
        score_sentiment,
        ["examples/generate_sentiment.py", "The battery died after two days and support never answered."],
    ),
    "tiny": Job(
        "configs/qlora.yml",
        "held-out headlines",
        score_headlines,
        ["examples/generate.py", "Kinloch Telecom disappoints with weak second-quarter sales"],
        score_threads=1,
    ),
}


def job_inputs(job: Job) -> list[str]:
    """The model and data paths ``job``'s config names (relative to the working directory, as Axolotl reads them)."""
    import yaml

    config = yaml.safe_load((REPO / job.config).read_text(encoding="utf-8"))
    return [config["base_model"], *(dataset["path"] for dataset in config["datasets"])]


def train(config: str, overrides: dict[str, str]) -> tuple[Any, Any]:
    """Axolotl's ``train`` on ``config`` as its CLI runs it in one process; the trained model and the config."""
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.integrations.base import PluginManager
    from axolotl.train import train as axolotl_train

    cfg = load_cfg(config, **overrides)
    plugins = PluginManager.get_instance()
    dataset_meta = plugins.load_datasets(cfg, preprocess=False) if cfg.get("plugins") else None
    if dataset_meta is None:
        dataset_meta = load_datasets(cfg=cfg, cli_args=TrainerCliArgs())
    model, _, _ = axolotl_train(cfg=cfg, dataset_meta=dataset_meta)
    if cfg.get("plugins"):
        plugins.post_train_unload(cfg)
    return model, cfg


def before_and_after(job: Job, model: Any, base: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Held-out accuracy of the trained model with its adapter, and of the same 4-bit base without it."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(job.score_threads or threads)
    try:
        after = job.score(model, tokenizer)
        with model.disable_adapter():
            before = job.score(model, tokenizer)
    finally:
        torch.set_num_threads(threads)
    return before, after


def shown(path: Path | str) -> str:
    """``path`` relative to the working directory where it lies below it (as a user would type it)."""
    path = Path(path).absolute()
    try:
        return os.fspath(path.relative_to(Path.cwd()))
    except ValueError:
        return os.fspath(path)


def summary(job: Job, before: dict[str, Any], after: dict[str, Any], output_dir: Path, seconds: float) -> list[str]:
    """The three result lines, then the next steps: ask the model, merge it, export it as GGUF."""
    python, qlora = shown(sys.executable), shown(Path(sys.executable).parent / "qlora")
    adapter = shown(output_dir)
    minutes, rest = divmod(round(seconds), 60)
    return [
        f"before: {before['accuracy']:.1%} held-out accuracy of the 4-bit base alone, zero-shot "
        f"({before['rows']} {job.data}, three labels)",
        f"after:  {after['accuracy']:.1%} with the QLoRA adapter trained now ({minutes} min {rest} s in all)",
        f"adapter: {adapter}/ (adapter_model.safetensors, qlora_recipe.json; full log: {adapter}/debug.log)",
        "next:",
        f"  ask it:        {shlex.join([python, *job.ask])}",
        f"  run it alone:  {qlora} merge {adapter} --out {adapter}-merged   (a plain 16-bit model, no plugin needed)",
        f"  or as GGUF:    {qlora} export {adapter} --format gguf --out {adapter}.gguf   (llama.cpp, Ollama)",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=sorted(JOBS), default="default")
    parser.add_argument("--output-dir", help="where the adapter goes (default: the config's output_dir)")
    parser.add_argument("--dataset-prepared-path", help="where Axolotl keeps the tokenized data")
    args = parser.parse_args(argv)
    started = time.monotonic()
    job = JOBS[args.job]
    missing = [path for path in job_inputs(job) if not Path(path).exists()]  # read from here, as Axolotl reads them
    if missing:
        fix = "run from the repository root, after python scripts/prepare_real_job.py (make train runs both)"
        parser.exit(2, f"error: {missing[0]} does not exist here. Fix: {fix}\n")
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    drop_expected_warnings()
    quiet_console()
    overrides = {key: getattr(args, key) for key in ("output_dir", "dataset_prepared_path") if getattr(args, key)}
    sys.argv = sys.argv[:1]  # Axolotl's trainer arguments are read from the command line too: none here
    print(f"training: {job.config} (Axolotl's notes and the full config: OUTPUT_DIR/debug.log)", flush=True)
    model, cfg = train(job.config, overrides)
    print(f"scoring the {job.data} with and without the adapter", flush=True)
    before, after = before_and_after(job, model, cfg.base_model)
    print("\n".join(summary(job, before, after, Path(cfg.output_dir), time.monotonic() - started)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
