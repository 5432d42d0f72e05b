"""What runs is what is recorded (issue 23, item 1): qlora_recipe.json, the log line and ``qlora inspect RUN``
come from the model that trained, whatever the recipe intended; merge and resume compare that record with
what they load and refuse a difference in one line naming both values."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from bad_inputs import assert_one_line_error, snapshot
from fuzz_inputs import check_cli, run_cli

from qlora_plugin import QLoRAConfigError, qlora_recipe
from qlora_plugin.core.fields import RECIPE_FILE

pytestmark = pytest.mark.slow
TEXTS = ["the cat sat on the mat", "a green frog jumps over the pond"] * 4


def fp4_config(double_quant: bool = False):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def trainer(model, recipe, out: Path, steps: int = 2, **sft):
    from datasets import Dataset
    from trl import SFTTrainer

    args = recipe.sft_config(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        save_steps=2,
        report_to="none",
        max_length=16,
        **sft,
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        peft_config=recipe,
        callbacks=recipe.callbacks(),
    )


def record(directory: Path) -> dict:
    return json.loads((directory / RECIPE_FILE).read_text())


@pytest.fixture(scope="module")
def fp4_run(tiny_model_dir, tmp_path_factory) -> Path:
    """The default (NF4) recipe trained over a model the user loaded in FP4 themselves; saved."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("fp4-run") / "out"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=fp4_config(), dtype=torch.bfloat16)
    run = trainer(model, qlora_recipe(), out)
    run.train()
    run.save_model(str(out))
    return out


def test_a_model_loaded_in_fp4_is_recorded_as_fp4_in_the_adapter_and_each_checkpoint(fp4_run) -> None:
    for directory in (fp4_run, fp4_run / "checkpoint-2"):
        saved = record(directory)
        assert (saved["quant_type"], saved["double_quant"], saved["blocksize"]) == ("fp4", False, 64), directory
        assert (saved["compute_dtype"], saved["quant_storage"], saved["recorded_from"]) == (
            "bfloat16",
            "uint8",
            "model",
        )
        assert saved["r"] == 16 and len(saved["target_modules"]) == 14


def test_the_user_is_told_the_run_trains_over_what_was_loaded(tiny_model_dir, tmp_path, caplog) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=fp4_config(), dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="qlora_plugin"):
        trainer(model, qlora_recipe(), tmp_path / "out")
    said = [r.getMessage() for r in caplog.records if "the base model was loaded as fp4" in r.getMessage()]
    assert len(said) == 1 and "the recipe says nf4" in said[0] and "records fp4" in said[0]


def test_a_users_fp4_quantization_config_through_model_init_kwargs_is_recorded_and_said(
    tiny_model_dir, tmp_path, caplog
) -> None:
    with caplog.at_level(logging.INFO, logger="qlora_plugin"):
        run = trainer(str(tiny_model_dir), qlora_recipe(), tmp_path / "out", model_init_kwargs={
            "quantization_config": fp4_config(double_quant=True)
        })  # fmt: skip
    assert any("load as 4-bit fp4 (double quant True" in r.getMessage() for r in caplog.records)
    run.train()
    assert record(tmp_path / "out" / "checkpoint-2")["quant_type"] == "fp4"


def test_merge_dequantizes_the_format_the_record_names(fp4_run, tiny_model_dir, tmp_path) -> None:
    status, stdout = check_cli(["merge", str(fp4_run), "--out", "merged", "--json"], tmp_path, (tmp_path / "merged",))
    summary = json.loads(stdout)
    assert status == 0 and summary["quantization"] == "fp4, double quant False"
    assert summary["quantization_from"] == str(fp4_run / RECIPE_FILE)


def test_merge_refuses_a_base_that_loads_in_another_format_than_the_record(fp4_run, tiny_model_dir, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    nf4_base = tmp_path / "nf4-base"
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=qlora_recipe().bnb_config("cpu"), dtype=torch.bfloat16
    )
    model.save_pretrained(nf4_base)  # saved in 4 bits: it loads as NF4 whatever merge asks for
    before = snapshot(tmp_path)
    status, _, stderr = run_cli(["merge", str(fp4_run), "--out", "merged", "--base", str(nf4_base)], tmp_path)
    assert status == 2, stderr
    assert_one_line_error(stderr.strip().split(": error: ", 1)[1], "quant_type", "nf4", "fp4")
    assert snapshot(tmp_path) == before


def test_inspect_of_a_run_shows_its_record(fp4_run, tmp_path) -> None:
    status, stdout = check_cli(["inspect", str(fp4_run)], tmp_path)
    assert status == 0 and "quant_type fp4" in stdout and "recorded from the model that trained" in stdout
    status, stdout = check_cli(["inspect", str(fp4_run / "checkpoint-2"), "--json"], tmp_path)
    assert json.loads(stdout)["record"]["quant_type"] == "fp4"


@pytest.fixture(scope="module")
def nf4_r8_run(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nf4-r8") / "out"
    trainer(str(tiny_model_dir), qlora_recipe(r=8), out).train()
    return out


@pytest.mark.parametrize(
    ("changes", "field", "both"),
    [({"r": 16}, "r", ("r=8", "r=16")), ({"r": 8, "quant_type": "fp4"}, "quant_type", ("'nf4'", "fp4"))],
    ids=["another-rank", "another-format"],
)
def test_resuming_with_another_recipe_is_one_line_naming_both(
    nf4_r8_run, tiny_model_dir, tmp_path, changes, field, both
) -> None:
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    for file in (nf4_r8_run / "checkpoint-2").iterdir():
        (out / "checkpoint-2" / file.name).write_bytes(file.read_bytes())
    run = trainer(str(tiny_model_dir), qlora_recipe(**changes), out, steps=4)
    with pytest.raises(QLoRAConfigError) as error:
        run.train(resume_from_checkpoint=True)
    assert error.value.field == field and len(str(error.value)) < 500  # not torch's wall of size mismatches
    assert_one_line_error(str(error.value), field, *both)


def test_a_resume_with_the_same_recipe_goes_on(nf4_r8_run, tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    for file in (nf4_r8_run / "checkpoint-2").iterdir():
        (out / "checkpoint-2" / file.name).write_bytes(file.read_bytes())
    run = trainer(str(tiny_model_dir), qlora_recipe(r=8), out, steps=4)
    run.train(resume_from_checkpoint=True)
    assert run.state.global_step == 4 and record(out / "checkpoint-4")["r"] == 8


def test_targets_found_on_a_peft_model_are_its_bases(tiny_model_dir) -> None:
    from peft import get_peft_model

    plain = qlora_recipe(model=tiny_model_dir)
    wrapped = get_peft_model(plain.load_model(tiny_model_dir), qlora_recipe(model=tiny_model_dir))
    assert sorted(qlora_recipe(model=wrapped).target_modules) == sorted(plain.target_modules)
    assert not any("base_layer" in name or "lora_" in name for name in qlora_recipe(model=wrapped).target_modules)


def test_one_recipe_over_two_bases_in_different_formats_refuses_to_guess_its_record(tiny_model_dir, tmp_path) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    recipe = qlora_recipe(model=tiny_model_dir)
    nf4 = get_peft_model(recipe.load_model(tiny_model_dir), recipe)
    fp4 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=fp4_config(), dtype=torch.bfloat16)
    both = get_peft_model(fp4, recipe)
    with pytest.raises(QLoRAConfigError) as error:
        nf4.save_pretrained(tmp_path / "a")
    assert_one_line_error(str(error.value), "more than one 4-bit format", "nf4", "fp4")
    assert not (tmp_path / "a" / "adapter_config.json").exists()
    del nf4, both, fp4, error  # the layers live in the bases PEFT wrapped in place, and in the traceback
    import gc

    gc.collect()
    alone = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=fp4_config(), dtype=torch.bfloat16),
        recipe,
    )
    alone.save_pretrained(tmp_path / "c")
    assert record(tmp_path / "c")["quant_type"] == "fp4"


# -- a symlinked --out --------------------------------------------------------------------------------------


def test_a_symlinked_out_is_honoured_and_stays_a_link(fp4_run, tmp_path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.symlink(target, tmp_path / "LINK")
    status, _ = check_cli(["merge", str(fp4_run), "--out", "LINK"], tmp_path, (tmp_path / "LINK", target))
    assert status == 0 and (tmp_path / "LINK").is_symlink() and os.readlink(tmp_path / "LINK") == str(target)
    assert (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LINK", "elsewhere"]  # no .LINK.*.old left


def test_a_symlink_to_nothing_is_refused(fp4_run, tmp_path) -> None:
    os.symlink(tmp_path / "nothing", tmp_path / "LINK")
    status, _, stderr = run_cli(["merge", str(fp4_run), "--out", "LINK"], tmp_path)
    assert status == 2 and "symbolic link" in stderr and (tmp_path / "LINK").is_symlink()


def test_a_relative_base_says_where_it_was_read_from(fp4_run, tiny_model_dir, tmp_path) -> None:
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "base")
    status, stdout = check_cli(["merge", str(fp4_run), "--out", "merged", "--base", "./base"], tmp_path,
                               (tmp_path / "merged",))  # fmt: skip
    assert status == 0 and f"base ./base read from {tmp_path / 'base'}" in " ".join(stdout.split())
