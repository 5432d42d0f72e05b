"""The shipped Axolotl configs: real-model ones mirror the embedded default and pass Axolotl's validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("axolotl")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT = CONFIGS / "qlora.yml"
REAL_MODEL = sorted(path for path in CONFIGS.glob("*.yml") if path != DEFAULT)
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
