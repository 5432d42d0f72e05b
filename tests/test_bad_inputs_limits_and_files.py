"""Values checked against the model's own limits, and files named as what they are (issue 23, items 4 and 5).

Every kind of file fault (missing, a directory, a dangling or looping link, unreadable, not JSON) is named
so at every place the package reads a file, and a local path or HF_HUB_OFFLINE never reaches the hub. A
sequence length past a learned position table is refused before the model's own IndexError; past rotary
positions it is a warning; a rank at least a layer's width is a warning."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from bad_inputs import assert_one_line_error
from fuzz_inputs import check_cli, run_cli

from qlora_plugin import QLoRAConfigError, qlora_recipe

PLUGIN = "qlora_plugin.axolotl.QLoRAPlugin"
ROWS = [{"instruction": f"label {i}: the cat sat on the mat", "input": "", "output": "positive"} for i in range(4)]


def file_faults(root: Path) -> dict[str, tuple[Path, str]]:
    """One path per kind of file fault, and the words that must name it."""
    root.mkdir()
    (root / "a-directory").mkdir()
    os.symlink(root / "nowhere", root / "dangling")
    os.symlink(root / "loop", root / "loop")
    (root / "not-json").write_text("{cut")
    faults = {
        "missing": (root / "missing", "does not exist"),
        "directory": (root / "a-directory", "is a directory, not a file"),
        "dangling": (root / "dangling", "which does not exist"),
        "loop": (root / "loop", "loops"),
        "not-json": (root / "not-json", "is not valid JSON"),
    }
    if os.geteuid() != 0:  # root reads any file
        (root / "unreadable").write_text("{}")
        (root / "unreadable").chmod(0)
        faults["unreadable"] = (root / "unreadable", "permission denied")
    return faults


@pytest.mark.parametrize("fault", ["missing", "directory", "dangling", "loop", "not-json", "unreadable"])
@pytest.mark.parametrize("where", ["model config.json", "adapter_config.json", "qlora_recipe.json", "CONFIGS_JSON"])
def test_every_file_fault_is_named_as_what_it_is_wherever_a_file_is_read(
    tiny_model_dir, tmp_path, fault, where
) -> None:
    faults = file_faults(tmp_path / "faults")
    if fault not in faults:
        pytest.skip("running as root: every file is readable")
    source, words = faults[fault]
    if fault == "missing" and where != "CONFIGS_JSON":
        words = "holds no"  # a directory without the file it needs is named as such
    work = tmp_path / "work"
    work.mkdir()
    if where == "model config.json":
        model = work / "model"
        shutil.copytree(tiny_model_dir, model)
        target, argv = model / "config.json", ["inspect", "model"]
    elif where == "CONFIGS_JSON":
        target, argv = work / "configs.json", ["convert-finlora", "configs.json", "entry", "--out", "out.yml"]
    else:
        adapter = work / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "r": 8, "base_model_name_or_path": str(tiny_model_dir)})
        )
        (adapter / "adapter_model.safetensors").write_bytes(b"")
        target, argv = adapter / where, ["merge", "adapter", "--out", "merged"]
    target.unlink(missing_ok=True)
    if fault != "missing":
        os.symlink(source, target)
    status, _ = check_cli(argv, work)
    _, _, stderr = run_cli(argv, work)
    assert status == 2 and words in stderr, stderr
    assert "No such file" not in stderr and "Errno" not in stderr


def test_an_adapter_without_its_weights_is_named_not_sent_to_the_hub(tiny_model_dir, tmp_path) -> None:
    from peft import get_peft_model

    recipe = qlora_recipe(model=tiny_model_dir)
    get_peft_model(recipe.load_model(tiny_model_dir), recipe).save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    check_cli(["merge", "adapter", "--out", "merged"], tmp_path)
    _, _, stderr = run_cli(["merge", "adapter", "--out", "merged"], tmp_path)
    assert "holds no adapter_model.safetensors" in stderr and "Connect" not in stderr


@pytest.mark.parametrize(
    ("base", "words"),
    [
        ("./models/base", "a relative path, read from the working directory"),
        ("../elsewhere/base", "a relative path, read from the working directory"),
        ("/no/such/base", "does not exist"),
    ],
)
def test_a_local_base_path_is_read_from_disk_only_and_says_from_where(tmp_path, base, words) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    check_cli(["merge", "adapter", "--out", "merged", "--assume-default-recipe"], tmp_path)
    _, _, stderr = run_cli(["merge", "adapter", "--out", "merged", "--assume-default-recipe"], tmp_path)
    assert words in stderr and base in stderr


def test_a_hub_id_while_offline_is_read_from_the_cache_only_and_says_so(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QLoRAConfigError) as error:
        qlora_recipe(model="no-such-org/no-such-model")
    assert_one_line_error(str(error.value), "no-such-org/no-such-model", "HF_HUB_OFFLINE")


# -- the model's limits ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, tiny_model_dir) -> Path:
    """A one-layer GPT-2 (a learned table of 16 positions) with the tiny Llama's tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("tiny-gpt2")
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=16, vocab_size=vocab)).save_pretrained(
        directory
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, directory / name)
    return directory


# How a TRL user builds the trainer: the recipe's config with or without its callbacks, or their own SFTConfig.
TRAINER_PATHS = ("recipe-config", "recipe-config-no-callbacks", "own-config")


def sft_trainer(model_dir: Path, tmp_path: Path, max_length: int, path: str = "recipe-config"):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    recipe = qlora_recipe()
    common = {"output_dir": str(tmp_path / "out"), "max_length": max_length, "report_to": "none", "max_steps": 1}
    args = SFTConfig(**common, bf16=False) if path == "own-config" else recipe.sft_config(**common)
    return SFTTrainer(
        model=str(model_dir),
        args=args,
        train_dataset=Dataset.from_dict({"text": ["the cat sat on the mat"] * 4}),
        peft_config=recipe,
        callbacks=recipe.callbacks() if path == "recipe-config" else None,
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", TRAINER_PATHS)
def test_max_length_past_a_learned_position_table_is_refused_before_the_index_error(tiny_gpt2, tmp_path, path) -> None:
    with pytest.raises(QLoRAConfigError) as error:
        sft_trainer(tiny_gpt2, tmp_path, max_length=64, path=path)
    assert error.value.field == "max_length"
    assert_one_line_error(str(error.value), "max_length", "16 positions", value="64")
    sft_trainer(tiny_gpt2, tmp_path, max_length=16, path=path)  # at the limit: fine


@pytest.mark.slow
@pytest.mark.parametrize("path", TRAINER_PATHS)
def test_max_length_past_rotary_positions_is_a_warning(tiny_model_dir, tmp_path, caplog, path) -> None:
    import logging

    with caplog.at_level(logging.WARNING, logger="qlora_plugin"):
        sft_trainer(tiny_model_dir, tmp_path, max_length=128, path=path)
    said = [r for r in caplog.records if "max_length=128 is more than the 64 positions" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]


def axolotl_project(directory: Path, model: Path, **changes) -> Path:
    shutil.copytree(model, directory / "model")
    (directory / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    config = {
        "base_model": "./model",
        "plugins": [PLUGIN],
        "qlora": {"r": 8},
        "datasets": [{"path": "./data.jsonl", "type": "alpaca"}],
        "sequence_len": 32,
        "output_dir": "./out",
        **changes,
    }
    (directory / "config.yml").write_text(yaml.safe_dump(config))
    return directory / "config.yml"


@pytest.mark.parametrize(
    ("model", "sequence_len", "status", "words"),
    [("gpt2", 64, 2, "more than the 16 positions"), ("llama", 128, 0, "more than the 64 positions")],
)
def test_check_compares_sequence_len_with_the_positions(
    tiny_gpt2, tiny_model_dir, tmp_path, model, sequence_len, status, words
) -> None:
    axolotl_project(tmp_path, tiny_gpt2 if model == "gpt2" else tiny_model_dir, sequence_len=sequence_len)
    found, _ = check_cli(["check", "config.yml"], tmp_path)
    _, stdout, stderr = run_cli(["check", "config.yml"], tmp_path)
    assert found == status and words in stdout + stderr


def test_the_plugin_refuses_sequence_len_past_a_learned_position_table(tiny_gpt2, tmp_path, monkeypatch) -> None:
    pytest.importorskip("axolotl")
    from axolotl.utils.dict import DictDefault

    from qlora_plugin.axolotl import QLoRAPlugin

    path = axolotl_project(tmp_path, tiny_gpt2, sequence_len=64)
    monkeypatch.chdir(tmp_path)
    cfg = DictDefault({**yaml.safe_load(path.read_text()), "axolotl_config_path": str(path)})
    with pytest.raises(QLoRAConfigError) as error:
        QLoRAPlugin().register(cfg)
    assert_one_line_error(str(error.value), "sequence_len", "16 positions", value="64")


def test_a_rank_at_least_a_layers_width_is_a_warning(tiny_model_dir, tmp_path) -> None:
    status, stdout = check_cli(["inspect", str(tiny_model_dir), "--set", "r=64"], tmp_path)
    assert status == 0 and "r=64 is at least the width of" in " ".join(stdout.split())
    status, stdout = check_cli(["inspect", str(tiny_model_dir), "--set", "r=8"], tmp_path)
    assert status == 0 and "at least the width" not in stdout
