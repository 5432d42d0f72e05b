"""TRL end to end: SFTTrainer(..., peft_config=recipe) trains real QLoRA on a CPU."""

from __future__ import annotations

import logging

import pytest
import torch

from qlora_plugin import qlora_recipe

pytestmark = pytest.mark.slow
STEPS = 30


def train(model, dataset, tmp_path, recipe, **args):
    from trl import SFTTrainer

    settings = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        max_length=32,
        seed=0,
    )
    config = recipe.sft_config(**{**settings, **args.pop("sft", {})}) if "plain" not in args else args.pop("plain")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, peft_config=recipe, **args)
    trainer.train()
    return trainer


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_true_qlora(trainer, recipe) -> None:
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    layers = [m for m in trainer.model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 14  # 7 linear layers x 2 blocks
    for layer in layers:
        base = layer.get_base_layer()
        assert isinstance(base, bnb.nn.Linear4bit)
        state = base.weight.quant_state
        assert (state.quant_type, state.blocksize, state.nested) == ("nf4", 64, True)
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


def assert_learned(trainer) -> None:
    history = losses(trainer)
    assert len(history) == STEPS
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last < 0.85 * first, history


RECIPE = dict(learning_rate=5e-3, lr_scheduler_type="constant", warmup_ratio=0.0)


def test_model_given_by_name_trains_as_qlora_with_paged_adamw(tiny_model_dir, memorisable_dataset, tmp_path, caplog):
    from qlora_plugin.build.notices import describe_optimizer

    recipe = qlora_recipe(**RECIPE)
    with caplog.at_level(logging.INFO, logger="qlora_plugin"):
        trainer = train(str(tiny_model_dir), memorisable_dataset, tmp_path, recipe)
    assert_true_qlora(trainer, recipe)
    assert_learned(trainer)
    assert describe_optimizer(trainer.optimizer) == "paged_adamw_32bit"
    assert any("optimizer: paged_adamw_32bit, as the recipe asks" in r.getMessage() for r in caplog.records)


def test_saved_adapter_reloads_onto_a_fresh_4bit_base_with_the_same_logits(
    tiny_model_dir, memorisable_dataset, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = qlora_recipe(**RECIPE)
    trainer = train(str(tiny_model_dir), memorisable_dataset, tmp_path, recipe)
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "qlora_recipe.json").exists()

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tokenizer(["the cat sat on the mat", "rain falls on the roof"], return_tensors="pt", padding=True)
    trained = trainer.model.eval()
    base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=recipe.bnb_config(), dtype=recipe.resolved_compute_dtype()
    )
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = trained(**batch).logits.float()
        actual = reloaded(**batch).logits.float()
        untrained = base.get_base_model()(**batch).logits.float() if hasattr(base, "get_base_model") else None
    scale = expected.abs().max()
    assert (actual - expected).abs().max() / scale < 2e-2
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))
    with reloaded.disable_adapter(), torch.no_grad():
        untrained = reloaded(**batch).logits.float()
    assert (untrained - expected).abs().max() / scale > 0.1  # the adapter is what makes the difference


def test_preloaded_4bit_model_trains_as_qlora(tiny_model_dir, memorisable_dataset, tmp_path):
    recipe = qlora_recipe(**RECIPE)
    model = recipe.load_model(tiny_model_dir)
    assert model.is_loaded_in_4bit
    trainer = train(model, memorisable_dataset, tmp_path, recipe)
    assert_true_qlora(trainer, recipe)
    assert_learned(trainer)


def test_preloaded_bf16_model_is_quantized_in_place(tiny_model_dir, memorisable_dataset, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    recipe = qlora_recipe(**RECIPE)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="qlora_plugin"):
        trainer = train(model, memorisable_dataset, tmp_path, recipe)
    assert_true_qlora(trainer, recipe)
    assert_learned(trainer)
    assert any("not loaded in 4 bits" in r.getMessage() for r in caplog.records)


def test_plain_trainer_args_are_reported_as_not_the_recipe(tiny_model_dir, memorisable_dataset, tmp_path, caplog):
    from trl import SFTConfig

    recipe = qlora_recipe(**RECIPE)
    plain = SFTConfig(
        output_dir=str(tmp_path / "plain"),
        max_steps=2,
        per_device_train_batch_size=8,
        report_to="none",
        save_strategy="no",
        max_length=32,
        bf16=False,
        model_init_kwargs={"quantization_config": recipe.bnb_config()},
    )
    with caplog.at_level(logging.WARNING, logger="qlora_plugin"):
        train(str(tiny_model_dir), memorisable_dataset, tmp_path, recipe, plain=plain)
    messages = [r.getMessage() for r in caplog.records]
    assert any("the trainer runs adamw_torch, not the recipe's paged_adamw_32bit" in m for m in messages), messages
