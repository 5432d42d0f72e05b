"""Mixture-of-experts QLoRA end to end on a CPU: TRL's SFTTrainer and ``axolotl train`` on tiny MoE models, the
experts in 4 bits with LoRA on them, the loss falling over 30 steps."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from tiny_moe import moe_model_dir

from qlora_plugin import QLoRAConfigError, qlora_recipe
from qlora_plugin.core.experts import find_experts

pytestmark = pytest.mark.slow
STEPS = 30
RECIPE = dict(learning_rate=5e-3, lr_scheduler_type="constant", warmup_ratio=0.0)


def assert_learned(history: list[float]) -> None:
    assert len(history) == STEPS, history
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last < 0.85 * first, history


def sft(model, recipe, dataset, tmp_path):
    from trl import SFTTrainer

    args = recipe.sft_config(
        output_dir=str(tmp_path / "run"),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        max_length=32,
        seed=0,
    )
    return SFTTrainer(model=model, args=args, train_dataset=dataset, peft_config=recipe, callbacks=recipe.callbacks())


@pytest.mark.parametrize(("family", "by_name"), [("qwen3_moe", True), ("gpt_oss", False)])
def test_sft_trainer_trains_lora_on_4bit_experts(family, by_name, memorisable_dataset, tmp_path) -> None:
    base = moe_model_dir(family, tmp_path / family)
    recipe = qlora_recipe(model=base, compute_dtype="float32", **RECIPE)
    model = str(base) if by_name else recipe.load_model(base)  # by name: TRL loads it, PEFT's wrapping quantizes
    trainer = sft(model, recipe, memorisable_dataset, tmp_path)
    experts = find_experts(trainer.model)
    assert [(m.quantized, len(m.adapted)) for m in experts] == [(True, 2), (True, 2)]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".experts." in n and "lora_B" in n}
    trainer.train()
    assert_learned([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    after = dict(trainer.model.named_parameters())
    assert before and all(not torch.equal(before[n], after[n]) for n in before)  # the expert adapters trained
    trainer.save_model(str(tmp_path / "adapter"))
    record = json.loads((tmp_path / "adapter" / "qlora_recipe.json").read_text())
    assert record["recorded_from"] == "model" and len(record["target_parameters"]) == 4  # 2 layers x 2 projections
    assert all(".experts." in name for name in record["target_parameters"])


def test_an_unresolved_recipe_on_a_moe_model_stops_before_the_first_step(memorisable_dataset, tmp_path) -> None:
    base = moe_model_dir("gpt_oss", tmp_path / "gpt_oss")
    recipe = qlora_recipe(compute_dtype="float32", **RECIPE)  # auto targets, never resolved on the model
    trainer = sft(recipe.load_model(base), recipe, memorisable_dataset, tmp_path)
    with pytest.raises(QLoRAConfigError, match="carry no LoRA adapter"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_axolotl_train_trains_lora_on_4bit_experts(memorisable_dataset, tmp_path) -> None:
    pytest.importorskip("axolotl")
    from test_axolotl_runs import axolotl_train

    base = moe_model_dir("mixtral", tmp_path / "mixtral")
    rows = [{"instruction": "repeat", "input": "", "output": text} for text in memorisable_dataset["text"]]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = tmp_path / "moe.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "base_model": str(base),
                "plugins": ["qlora_plugin.axolotl.QLoRAPlugin"],
                "qlora": {"compute_dtype": "float32", **RECIPE},
                "datasets": [{"path": str(data), "ds_type": "json", "type": "alpaca"}],
                "dataset_prepared_path": str(tmp_path / "prepared"),
                "dataset_num_proc": 1,
                "val_set_size": 0,
                "sequence_len": 64,
                "micro_batch_size": 8,
                "max_steps": STEPS,
                "save_strategy": "no",
                "logging_steps": 1,
                "seed": 7,
                "output_dir": str(tmp_path / "out"),
            }
        )
    )
    done = axolotl_train(config)
    assert done.returncode == 0, done.stderr[-4000:]
    log = done.stdout + done.stderr
    assert_learned([float(loss) for loss in re.findall(r"\{'loss': '([^']+)'", log)])
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert len(adapter["target_parameters"]) == 4 and adapter["lora_dropout"] == 0
    assert "mixture-of-experts experts stored in 4 bits" in log
