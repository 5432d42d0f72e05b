"""No hidden state across calls (issue 23, item 2): one recipe used twice, two recipes in one process, and a
recipe after a failed call behave as fresh ones. Tested by what a user sees (the adapters a trainer starts
from, the configs and settings made), not by where any state is kept."""

from __future__ import annotations

import logging

import pytest
import torch

from qlora_plugin import QLoRAConfigError, qlora_recipe

TEXTS = ["the cat sat on the mat", "a green frog jumps over the pond"] * 4


def initial_adapters(model_dir, recipe, args) -> dict[str, torch.Tensor]:
    """The LoRA A weights an SFTTrainer built with ``args`` and ``recipe`` starts from."""
    from datasets import Dataset
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=str(model_dir), args=args, train_dataset=Dataset.from_dict({"text": TEXTS}), peft_config=recipe
    )
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "lora_A" in name}


def config(recipe, tmp_path, seed: int):
    return recipe.sft_config(output_dir=str(tmp_path / f"out-{seed}"), seed=seed, report_to="none", max_length=16)


@pytest.mark.slow
def test_a_trainer_starts_from_the_seed_of_its_own_config_not_the_last_one_made(tiny_model_dir, tmp_path) -> None:
    recipe = qlora_recipe()
    first, second = config(recipe, tmp_path, 1), config(recipe, tmp_path, 2)
    used_first = initial_adapters(tiny_model_dir, recipe, first)
    fresh = qlora_recipe()
    fresh_first = initial_adapters(tiny_model_dir, fresh, config(fresh, tmp_path, 1))
    used_second = initial_adapters(tiny_model_dir, recipe, second)
    assert used_first.keys() == fresh_first.keys() and len(used_first) == 14
    assert all(torch.equal(used_first[name], fresh_first[name]) for name in used_first)  # seed 1, as configured
    assert not any(torch.equal(used_first[name], used_second[name]) for name in used_first)  # seed 2 differs


@pytest.mark.slow
def test_adapters_built_outside_a_trainer_start_the_same_whatever_ran_before(tiny_model_dir) -> None:
    from peft import get_peft_model

    def adapters() -> dict[str, torch.Tensor]:
        recipe = qlora_recipe()
        model = get_peft_model(recipe.load_model(tiny_model_dir), recipe)
        return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_A" in name}

    torch.manual_seed(1)
    first = adapters()
    torch.manual_seed(2)
    second = adapters()
    assert all(torch.equal(first[name], second[name]) for name in first)


def settings_of(recipe, tmp_path, **overrides) -> dict:
    made = recipe.sft_config(output_dir=str(tmp_path / "out"), report_to="none", **overrides).to_dict()
    made["model_init_kwargs"] = {key: str(value) for key, value in made["model_init_kwargs"].items()}
    return made


@pytest.mark.parametrize(
    ("failing", "recipe_fields"),
    [
        ({"fsdp": "full_shard"}, {"quant_storage": "uint8"}),  # refused under FSDP after FSDP was noted
        ({"learning_rate": "fast"}, {}),  # refused before anything
        ({"load_best_model_at_end": True, "save_strategy": "epoch", "eval_strategy": "steps"}, {}),  # TRL refuses
    ],
    ids=["fsdp-storage", "bad-value", "trl-refuses"],
)
def test_a_recipe_after_a_failed_call_behaves_as_a_fresh_one(tmp_path, failing, recipe_fields) -> None:
    recipe = qlora_recipe(**recipe_fields)
    with pytest.raises(QLoRAConfigError):
        recipe.sft_config(output_dir=str(tmp_path / "out"), report_to="none", **failing)
    fresh = qlora_recipe(**recipe_fields)
    assert str(recipe.bnb_config()) == str(fresh.bnb_config())  # used directly, as PEFT and loaders use it
    assert recipe.training_args() == fresh.training_args()
    assert settings_of(recipe, tmp_path) == settings_of(fresh, tmp_path)


def test_one_recipe_used_twice_makes_the_same_config_and_says_so_each_time(tmp_path, caplog) -> None:
    recipe = qlora_recipe()
    with caplog.at_level(logging.INFO, logger="qlora_plugin"):
        first = settings_of(recipe, tmp_path, learning_rate=1e-3)
        second = settings_of(recipe, tmp_path, learning_rate=1e-3)
    said = [r.getMessage() for r in caplog.records if "in SFTConfig" in r.getMessage()]
    assert len(said) == 2 and said[0] == said[1]  # the second call's config is reported too
    assert first == second == settings_of(qlora_recipe(), tmp_path, learning_rate=1e-3)


def test_two_recipes_in_one_process_keep_their_own_settings(tmp_path) -> None:
    paper, default = qlora_recipe("paper", r=8), qlora_recipe()
    made_paper = settings_of(paper, tmp_path)
    made_default = settings_of(default, tmp_path)
    assert made_paper == settings_of(qlora_recipe("paper", r=8), tmp_path)
    assert made_default == settings_of(qlora_recipe(), tmp_path)
