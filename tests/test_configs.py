"""The shipped Axolotl configs: real-model ones mirror the embedded default and pass Axolotl's validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("axolotl")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT = CONFIGS / "qlora.yml"
SMOLLM2 = CONFIGS / "qlora-smollm2.yml"  # the CPU real-model job: local model, chat data (tested below)
FSDP2 = CONFIGS / "qlora-fsdp2.yml"  # the default job sharded over GPUs (tests/test_multi_gpu_configs.py)
REAL_MODEL = sorted(path for path in CONFIGS.glob("*.yml") if path not in (DEFAULT, SMOLLM2, FSDP2))
# What a real-model config may change: the model, the data, the sizes, where it writes,
# and the recipe's hyper-parameters (a 1M-parameter model needs another learning rate).
MODEL_DATA_SIZES = {
    "base_model",
    "datasets",
    "val_set_size",
    "sequence_len",
    "micro_batch_size",
    "gradient_accumulation_steps",
    "num_epochs",
    "dataset_prepared_path",
    "dataset_num_proc",
    "output_dir",
    "logging_steps",
    "save_strategy",
    "qlora",
}


def read(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_there_are_real_model_configs_for_two_families() -> None:
    assert {path.name for path in REAL_MODEL} >= {"llama-3.1-8b-instruct.yml", "qwen2.5-7b-instruct.yml"}


@pytest.mark.parametrize("path", REAL_MODEL, ids=lambda path: path.name)
def test_a_real_model_config_differs_from_the_default_only_in_model_data_and_sizes(path: Path) -> None:
    default, real = read(DEFAULT), read(path)
    differing = {key for key in default.keys() | real.keys() if default.get(key) != real.get(key)}
    assert differing <= MODEL_DATA_SIZES, differing - MODEL_DATA_SIZES
    assert real["plugins"] == default["plugins"] == ["qlora_plugin.axolotl.QLoRAPlugin"]
    assert "/" in real["base_model"] and not real["base_model"].startswith(".")  # a hub id


@pytest.mark.parametrize("path", REAL_MODEL, ids=lambda path: path.name)
def test_a_real_model_config_passes_axolotls_validation(path: Path, tiny_model_dir, tmp_path) -> None:
    """Every key but the model and the data (offline here) goes through Axolotl's real load_cfg."""
    from axolotl.cli.config import load_cfg

    from qlora_plugin.integrations.axolotl.expand import recipe_from_section

    config = read(path)
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "Classify.", "input": "Shares jump", "output": "positive"}\n')
    config.update(
        base_model=str(tiny_model_dir),
        datasets=[{"path": str(data), "ds_type": "json", "type": "alpaca"}],
        output_dir=str(tmp_path / "out"),
        dataset_prepared_path=str(tmp_path / "prepared"),
    )
    local = tmp_path / path.name
    local.write_text(yaml.safe_dump(config), encoding="utf-8")

    cfg = load_cfg(str(local))
    recipe = recipe_from_section(config["qlora"])
    assert (cfg.adapter, cfg.load_in_4bit, cfg.optimizer) == ("qlora", True, "paged_adamw_32bit")
    assert (cfg.lora_r, cfg.lora_alpha, cfg.learning_rate) == (recipe.r, recipe.lora_alpha, recipe.learning_rate)
    assert cfg.bnb_config_kwargs["bnb_4bit_quant_type"] == "nf4"
    assert cfg.bnb_config_kwargs["bnb_4bit_use_double_quant"] is True


def test_the_smollm2_job_leaves_qlora_to_the_plugin_and_reads_the_prepared_cache() -> None:
    config = read(SMOLLM2)
    owned = {
        "adapter",
        "load_in_4bit",
        "bnb_config_kwargs",
        "optimizer",
        "bf16",
        "fp16",
        "lora_r",
        "lora_alpha",
        "lora_target_modules",
        "lora_target_linear",
        "learning_rate",
        "micro_batch_size",
        "gradient_checkpointing",
    }
    assert config["plugins"] == ["qlora_plugin.axolotl.QLoRAPlugin"] and owned.isdisjoint(config)
    assert config["qlora"]["compute_dtype"] == "float32"
    assert config["base_model"] == "./.cache/qlora-real/smollm2-135m-instruct"
    assert [d["path"] for d in config["datasets"]] == ["./.cache/qlora-real/sentiment/train.jsonl"]
    assert config["datasets"][0]["type"] == "chat_template" and config["datasets"][0]["roles_to_train"] == ["assistant"]


def test_the_smollm2_job_passes_axolotls_validation(tiny_model_dir, tmp_path) -> None:
    """Axolotl's real load_cfg on the job's config, with the tiny model and a chat row standing in for the cache."""
    from axolotl.cli.config import load_cfg

    config = read(SMOLLM2)
    data = tmp_path / "train.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "Great."}, {"role": "assistant", "content": "positive"}]}\n'
    )
    config.update(
        base_model=str(tiny_model_dir),
        datasets=[{**config["datasets"][0], "path": str(data)}],
        output_dir=str(tmp_path / "out"),
        dataset_prepared_path=str(tmp_path / "prepared"),
    )
    local = tmp_path / SMOLLM2.name
    local.write_text(yaml.safe_dump(config), encoding="utf-8")

    cfg = load_cfg(str(local))
    assert (cfg.adapter, cfg.load_in_4bit, cfg.optimizer) == ("qlora", True, "paged_adamw_32bit")
    assert (cfg.lora_r, cfg.learning_rate, cfg.micro_batch_size) == (
        16,
        config["qlora"]["learning_rate"],
        config["qlora"]["per_device_train_batch_size"],
    )
    assert not cfg.gradient_checkpointing and cfg.max_steps == config["max_steps"]
