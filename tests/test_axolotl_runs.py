"""Real ``axolotl train`` runs of the plugin: the recipe in every output, an FP4 run merged as FP4, the
same losses from the same config and seed, a full disk while writing a checkpoint after an exact resume
that skipped an incomplete checkpoint, and the plugin's message as the last line of a failed run."""

from __future__ import annotations

import filecmp
import json
import os
import re
import resource
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from bad_inputs import assert_one_line_error, stderr_lines
from cli_helpers import axolotl_command, axolotl_env

from qlora_plugin.commands.main import main
from qlora_plugin.integrations.checkpoints import complete_checkpoints

pytest.importorskip("axolotl")
pytestmark = pytest.mark.slow
PLUGIN = "qlora_plugin.axolotl.QLoRAPlugin"
LOGGED = re.compile(r"\{'loss': '([^']+)', 'grad_norm': '([^']+)'")
SENTENCES = [
    "the cat sat on the mat",
    "a green frog jumps over the quiet pond",
    "seven blue birds sing",
    "my brother reads a long book",
    "the baker sells warm bread",
    "rain falls on the roof",
]


def training_data(directory: Path) -> Path:
    rows = [{"instruction": f"repeat {s}", "input": "", "output": s} for s in SENTENCES * 3]
    path = directory / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def config(tiny_model_dir: Path, directory: Path, out: Path, **changes) -> Path:
    """An Axolotl config for the tiny model, FP4 base, 6 steps with a checkpoint every 3."""
    settings = {
        "base_model": str(tiny_model_dir),
        "plugins": [PLUGIN],
        "qlora": {"quant_type": "fp4", "compute_dtype": "float32", "learning_rate": 0.01, "warmup_ratio": 0.0},
        "datasets": [{"path": str(training_data(directory)), "ds_type": "json", "type": "alpaca"}],
        "dataset_prepared_path": str(directory / "prepared"),
        "dataset_num_proc": 1,
        "val_set_size": 0,
        "sequence_len": 64,
        "micro_batch_size": 2,
        "max_steps": 6,
        "save_strategy": "steps",
        "save_steps": 3,
        "logging_steps": 1,
        "seed": 7,
        "output_dir": str(out),
        **changes,
    }
    path = directory / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(settings))
    return path


def axolotl_train(path: Path, *, file_size_limit: int | None = None) -> subprocess.CompletedProcess[str]:
    """``axolotl train PATH --launcher python`` (one process, so its last line is the run's last line)."""

    def limit() -> None:
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(
        [axolotl_command(), "train", str(path), "--launcher", "python"],
        check=False,
        capture_output=True,
        text=True,
        env=axolotl_env(),
        preexec_fn=limit,
        timeout=900,
        cwd=path.parent,
    )


def logged(result: subprocess.CompletedProcess[str]) -> list[tuple[str, str]]:
    return LOGGED.findall(result.stdout + result.stderr)


@pytest.fixture(scope="module")
def fp4_run(tiny_model_dir, tmp_path_factory) -> tuple[Path, list[tuple[str, str]]]:
    """A finished FP4 run: (output directory, (loss, grad_norm) of each step)."""
    directory = tmp_path_factory.mktemp("fp4-run")
    done = axolotl_train(config(tiny_model_dir, directory, directory / "out"))
    assert done.returncode == 0, done.stderr[-4000:]
    return directory / "out", logged(done)


def test_every_output_of_the_run_carries_the_recipe(fp4_run) -> None:
    out, steps = fp4_run
    assert len(steps) == 6
    for directory in (out, out / "checkpoint-3", out / "checkpoint-6"):
        recipe = json.loads((directory / "qlora_recipe.json").read_text())
        assert (recipe["quant_type"], recipe["double_quant"], recipe["learning_rate"]) == ("fp4", True, 0.01)
        assert (recipe["recorded_from"], recipe["blocksize"], recipe["compute_dtype"]) == ("model", 64, "float32")
    manifest = json.loads((out / "checkpoint-3" / "qlora_checkpoint.json").read_text())["files"]
    assert manifest["optimizer.pt"] == (out / "checkpoint-3" / "optimizer.pt").stat().st_size


def test_a_resume_with_another_recipe_stops_before_axolotl_loads_the_checkpoint(fp4_run, tiny_model_dir) -> None:
    """What the plugin runs in pre_lora_load: the checkpoint Axolotl will resume from, compared with the model."""
    from qlora_plugin import QLoRAConfigError, qlora_recipe
    from qlora_plugin.integrations.checkpoints import check_resume, resume_checkpoint

    out, _ = fp4_run
    checkpoint = resume_checkpoint({"auto_resume_from_checkpoints": True, "output_dir": str(out)})
    assert checkpoint == out / "checkpoint-6"
    assert resume_checkpoint({"resume_from_checkpoint": str(out / "checkpoint-3")}) == out / "checkpoint-3"
    with pytest.raises(QLoRAConfigError) as error:
        check_resume(checkpoint, qlora_recipe().load_model(tiny_model_dir))  # an NF4 base under FP4 checkpoints
    assert error.value.field == "quant_type" and "records quant_type='fp4'" in str(error.value)
    fp4 = qlora_recipe(quant_type="fp4", compute_dtype="float32").load_model(tiny_model_dir)
    with pytest.raises(QLoRAConfigError) as error:
        check_resume(checkpoint, fp4, r=32)
    assert error.value.field == "r" and "records r=16" in str(error.value)
    check_resume(checkpoint, fp4, r=16)  # the same recipe resumes


def merged_logits(directory: Path, tiny_model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tokenizer(SENTENCES[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(directory).eval()(**batch).logits.float()


def trained_logits(adapter: Path, tiny_model_dir: Path, quant_type: str) -> torch.Tensor:
    """The adapter over the base as training saw it (4-bit ``quant_type``, dequantized to float32), unmerged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_plugin import qlora_recipe

    bnb = qlora_recipe(quant_type=quant_type).bnb_config("cpu")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb, dtype=torch.float32)
    model = PeftModel.from_pretrained(base.dequantize().to(torch.float32), adapter).eval()
    batch = AutoTokenizer.from_pretrained(tiny_model_dir)(SENTENCES[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


def test_an_fp4_run_merges_as_fp4(fp4_run, tiny_model_dir, tmp_path, capsys) -> None:
    out, _ = fp4_run
    assert main(["merge", str(out), "--out", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    assert "4-bit format from " + str(out / "qlora_recipe.json") in capsys.readouterr().out
    expected = trained_logits(out, tiny_model_dir, "fp4")
    actual = merged_logits(tmp_path / "merged", tiny_model_dir)
    assert (actual - expected).abs().max() / expected.abs().max() < 1e-4
    # what the merge did before it read the run's records: NF4, a different model
    assert (trained_logits(out, tiny_model_dir, "nf4") - expected).abs().max() > 0.05


def test_a_checkpoint_finds_the_recipe_of_its_run_and_a_copy_without_records_is_refused(
    fp4_run, tiny_model_dir, tmp_path, capsys
) -> None:
    out, _ = fp4_run
    inside = out / "checkpoint-6"
    recorded = (inside / "qlora_recipe.json").read_bytes()
    (inside / "qlora_recipe.json").unlink()
    try:
        assert main(["merge", str(inside), "--out", str(tmp_path / "from-run"), "--dtype", "fp32"]) == 0
        assert "4-bit format from " + str(out / "qlora_recipe.json") in capsys.readouterr().out
    finally:
        (inside / "qlora_recipe.json").write_bytes(recorded)
    alone = tmp_path / "checkpoint-6"
    shutil.copytree(inside, alone)
    (alone / "qlora_recipe.json").unlink()
    assert main(["merge", str(alone), "--out", str(tmp_path / "guessed")]) == 2
    assert_one_line_error(capsys.readouterr().err.strip(), "ADAPTER_DIR", "--quant-type", value=repr(str(alone)))
    assert not (tmp_path / "guessed").exists()
    assert main(["merge", str(alone), "--out", str(tmp_path / "told"), "--dtype", "fp32", "--quant-type", "fp4"]) == 0
    expected = trained_logits(inside, tiny_model_dir, "fp4")
    assert (merged_logits(tmp_path / "told", tiny_model_dir) - expected).abs().max() / expected.abs().max() < 1e-4


def test_the_same_config_and_seed_give_the_same_losses_from_step_one(fp4_run, tiny_model_dir, tmp_path) -> None:
    _, first = fp4_run
    again = axolotl_train(config(tiny_model_dir, tmp_path, tmp_path / "again"))
    assert again.returncode == 0, again.stderr[-4000:]
    assert logged(again) == first


def test_a_full_disk_at_a_checkpoint_leaves_complete_checkpoints_and_the_run_resumes_exactly(
    fp4_run, tiny_model_dir, tmp_path
) -> None:
    source, first = fp4_run
    out = tmp_path / "out"
    out.mkdir()
    for name in ("checkpoint-3", "qlora_recipe.json", "qlora_expanded.yml"):
        (shutil.copytree if (source / name).is_dir() else shutil.copy)(source / name, out / name)
    # what SIGKILL leaves while checkpoint-4 is written: no trainer state, the optimizer cut short
    shutil.copytree(out / "checkpoint-3", out / "checkpoint-4")
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    os.truncate(out / "checkpoint-4" / "optimizer.pt", 1000)
    path = config(tiny_model_dir, tmp_path, out, auto_resume_from_checkpoints=True)

    adapter_bytes = (source / "checkpoint-3" / "adapter_model.safetensors").stat().st_size
    full = axolotl_train(path, file_size_limit=adapter_bytes // 2)  # the next checkpoint's weights cannot be written
    assert full.returncode != 0
    last = stderr_lines(full.stderr)[-1]
    assert last.startswith("qlora: the run stopped while writing checkpoint-6"), full.stderr[-3000:]
    assert "resume from checkpoint-3" in last
    assert "checkpoint-4 is incomplete: it has no trainer_state.json" in full.stdout + full.stderr
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == [
        ".incomplete-checkpoint-4",
        "checkpoint-3",
    ]
    assert not filecmp.dircmp(out / "checkpoint-3", source / "checkpoint-3").diff_files
    assert logged(full) == first[3:]  # steps 4-6 resumed from checkpoint-3, as the uninterrupted run trained them
    # what is left resumes as this run did: checkpoint-3 is complete, nothing incomplete is named checkpoint-N
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-3"]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"qlora": {"lora_dropout": 1.5}}, "qlora: error: qlora.lora_dropout=1.5: is out of range. Fix: "),
        ({"datasets": [{"path": "EMPTY", "ds_type": "json", "type": "alpaca"}]}, "qlora: error: "),
    ],
    ids=["section", "empty-dataset"],
)
def test_a_rejected_run_ends_with_the_plugins_line(tiny_model_dir, tmp_path, change, expected) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    if "datasets" in change:
        change["datasets"][0]["path"] = str(empty)
    done = axolotl_train(config(tiny_model_dir, tmp_path, tmp_path / "out", **change))
    assert done.returncode != 0
    last = stderr_lines(done.stderr)[-1]
    assert last.startswith(expected), done.stderr[-3000:]
    assert_one_line_error(last.removeprefix("qlora: error: "))
    if "datasets" in change:
        assert f"datasets[0].path='{empty}': is an empty file" in last
    assert "Traceback" not in done.stderr  # the plugin's error is the line, not a traceback
    assert set(os.listdir(tmp_path / "out")) <= {"debug.log"} if (tmp_path / "out").exists() else True
