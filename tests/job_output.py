"""``make train`` / ``make train-tiny`` (``scripts/default_job.py``) run from a test, and what a person reads of it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from cli_helpers import axolotl_env

REPO = Path(__file__).resolve().parents[1]
SUMMARY_LINES = 7  # before, after, adapter; "next:", how to ask it, how to run it elsewhere (merged, GGUF)
PROGRESS = re.compile(r"\d+%\|.*\|")  # a tqdm bar
ACCURACY = re.compile(r"([\d.]+)% ")
TRAINER_LOG = re.compile(r"\{'(loss|train_runtime)'")  # the losses Trainer logs, and its final figures


def run_job_script(job: str, out: Path, *, timeout: int) -> subprocess.CompletedProcess[str]:
    """``python scripts/default_job.py --job JOB`` from the repository root as the Makefile runs it, its
    output dir and prepared data under ``out`` (the adapter in ``out/adapter``); stdout and stderr together."""
    command = [sys.executable, "scripts/default_job.py", "--job", job]
    command += ["--output-dir", str(out / "adapter"), "--dataset-prepared-path", str(out / "prepared")]
    return subprocess.run(
        command, cwd=REPO, env=axolotl_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=timeout,
    )  # fmt: skip


def read_lines(output: str) -> list[str]:
    """The lines a terminal keeps: each carriage-return redraw is one line, progress bars and blank lines left out."""
    lines = [part for line in output.splitlines() for part in line.split("\r")]
    return [line for line in lines if line.strip() and not PROGRESS.search(line)]


def assert_summary(lines: list[str], adapter: Path, ask: str) -> tuple[float, float]:
    """The job ends with the three result lines and the next steps; (accuracy before, after) as fractions."""
    before, after, where, nxt, ask_line, elsewhere, gguf = lines[-SUMMARY_LINES:]
    assert before.startswith("before: ") and "4-bit base alone, zero-shot" in before, before
    assert after.startswith("after:  ") and "adapter" in after, after
    assert where.startswith(f"adapter: {adapter}/ ") and "debug.log" in where, where
    assert nxt == "next:" and ask in ask_line and "qlora merge" in elsewhere, lines[-SUMMARY_LINES:]
    assert f"qlora export {adapter} --format gguf" in gguf, gguf
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "qlora_recipe.json").is_file()
    return tuple(float(ACCURACY.search(line)[1]) / 100 for line in (before, after))  # type: ignore[return-value]
