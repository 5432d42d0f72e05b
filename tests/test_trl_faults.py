"""The TRL path under faults and reruns: adapters initialised from the run's seed, checkpoints complete or
absent with the recipe in each, a resume that skips an incomplete checkpoint, and real SIGTERM / SIGKILL
during training leaving a run that resumes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _trl_job import losses, train
from cli_helpers import SRC

from qlora_plugin.integrations.checkpoints import CHECKPOINT, incomplete_reason

pytestmark = pytest.mark.slow
JOB = Path(__file__).with_name("_trl_job.py")


def initial_adapters(tiny_model_dir: Path, global_seed: int, run_seed: int | None = None) -> dict[str, torch.Tensor]:
    """The adapters PEFT builds by hand (no run seed), or a TRL trainer built with ``seed=run_seed``."""
    import tempfile

    from datasets import Dataset
    from peft import get_peft_model
    from trl import SFTTrainer

    from qlora_plugin import qlora_recipe

    recipe = qlora_recipe()
    torch.manual_seed(global_seed)  # whatever ran before: another model, a data shuffle
    if run_seed is None:
        model = get_peft_model(recipe.load_model(tiny_model_dir), recipe)
    else:
        with tempfile.TemporaryDirectory() as out:
            args = recipe.sft_config(output_dir=out, seed=run_seed, report_to="none", max_length=16)
            data = Dataset.from_dict({"text": ["the cat sat on the mat"] * 4})
            model = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=data, peft_config=recipe).model
    return {
        name.removeprefix("base_model.model."): p.detach().clone()
        for name, p in model.named_parameters()
        if "lora_A" in name
    }


def test_adapters_start_from_the_runs_seed_not_from_whatever_ran_before(tiny_model_dir) -> None:
    first, second = initial_adapters(tiny_model_dir, 1), initial_adapters(tiny_model_dir, 2)
    assert first.keys() == second.keys() and len(first) == 14
    assert all(torch.equal(first[name], second[name]) for name in first)
    other = initial_adapters(tiny_model_dir, 1, run_seed=5)
    assert not any(torch.equal(first[name], other[name]) for name in first)
    layers = list(first.values())
    assert not torch.equal(layers[0], layers[7])  # each layer draws its own weights


def test_two_trl_runs_of_the_same_config_and_seed_have_the_same_losses(tiny_model_dir, tmp_path) -> None:
    first = losses(train(tiny_model_dir, tmp_path / "a", 4, save_steps=100))
    torch.rand(1000)
    assert losses(train(tiny_model_dir, tmp_path / "b", 4, save_steps=100)) == first


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory) -> tuple[Path, list[float]]:
    out = tmp_path_factory.mktemp("trl-full") / "out"
    return out, losses(train(tiny_model_dir, out, 6))


def test_each_checkpoint_is_complete_and_carries_the_recipe(full_run) -> None:
    out, _ = full_run
    for step in (2, 4, 6):
        checkpoint = out / f"checkpoint-{step}"
        assert incomplete_reason(checkpoint) is None
        assert json.loads((checkpoint / "qlora_recipe.json").read_text())["quant_type"] == "nf4"
        assert "optimizer.pt" in json.loads((checkpoint / "qlora_checkpoint.json").read_text())["files"]


def test_resume_skips_a_checkpoint_whose_files_were_cut_short(full_run, tiny_model_dir, tmp_path, caplog) -> None:
    source, expected = full_run
    out = tmp_path / "out"
    for step in (2, 4):
        shutil.copytree(source / f"checkpoint-{step}", out / f"checkpoint-{step}")
    written = (out / "checkpoint-4" / "optimizer.pt").stat().st_size
    os.truncate(out / "checkpoint-4" / "optimizer.pt", written // 2)  # the state file is there; the optimizer is not
    with caplog.at_level("WARNING", logger="qlora_plugin"):
        resumed = train(tiny_model_dir, out, 6, resume=True)
    assert any(
        f"checkpoint-4 is incomplete: optimizer.pt has {written // 2} bytes, {written} were written" in r.message
        for r in caplog.records
    ), [r.message for r in caplog.records]
    # steps 1-2 from checkpoint-2's history, 3-6 trained again from its weights, optimizer and RNG states
    assert losses(resumed)[:2] == expected[:2] and losses(resumed)[2:] == pytest.approx(expected[2:], rel=1e-3)
    assert (out / ".incomplete-checkpoint-4").is_dir() and incomplete_reason(out / "checkpoint-4") is None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_signal_during_training_leaves_a_run_that_resumes(tiny_model_dir, tmp_path, signum) -> None:
    out = tmp_path / "out"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(SRC), str(JOB.parent)]),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    process = subprocess.Popen(
        [sys.executable, str(JOB), str(tiny_model_dir), str(out), "400"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-4").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode in (128 + signum, -signum), stderr[-3000:]
    if signum == signal.SIGTERM:
        assert "Traceback" not in stderr
        assert all(incomplete_reason(d) is None for d in out.glob("checkpoint-*"))  # complete or absent
    steps = sorted(
        int(CHECKPOINT.fullmatch(d.name).group(1)) for d in out.glob("checkpoint-*") if incomplete_reason(d) is None
    )
    resumed = train(tiny_model_dir, out, steps[-1] + 2, resume=True)
    assert resumed.state.global_step == steps[-1] + 2
    assert not [d for d in out.glob("checkpoint-*") if incomplete_reason(d) is not None]
