"""benchmarks/build_quantized.py: a model built straight into 4 bits, one decoder layer at a time."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import build_quantized as builder  # noqa: E402

from qlora_plugin import qlora_recipe  # noqa: E402


@pytest.fixture
def config():
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return config


def _four_bit(model) -> dict[str, torch.nn.Module]:
    import bitsandbytes as bnb

    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_its_4bit_layers_are_what_loading_the_same_weights_through_the_recipe_gives(config, tmp_path) -> None:
    recipe = qlora_recipe(compute_dtype="float32")
    built = builder.build_quantized(config, recipe, "cpu")
    builder.build_quantized(config, recipe, "cpu", quantize=False).save_pretrained(tmp_path / "full")
    loaded = recipe.load_model(tmp_path / "full", device_map={"": "cpu"})
    ours, theirs = _four_bit(built), _four_bit(loaded)
    assert len(ours) == 7 * config.num_hidden_layers and set(ours) == set(theirs)
    from bitsandbytes.functional import dequantize_4bit

    for name, layer in ours.items():
        assert torch.equal(layer.weight.data, theirs[name].weight.data), name
        assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested
        ours_dense = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert torch.equal(ours_dense, dequantize_4bit(theirs[name].weight.data, theirs[name].weight.quant_state))
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(built.get_parameter(name), loaded.get_parameter(name)), name


def test_no_two_layers_are_16_bit_at_once(config, monkeypatch) -> None:
    """The point of building layer by layer: the 16-bit model never exists whole."""
    from qlora_plugin.build import quantization

    recipe = qlora_recipe(compute_dtype="float32")
    models: list[torch.nn.Module] = []
    most = [0]
    real = quantization.quantize_linear

    def counting(layer, *args, **kwargs):
        model = models[0]
        wide = {
            name.split(".layers.")[1].split(".")[0]
            for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and ".layers." in name and not module.weight.is_meta
        }
        most[0] = max(most[0], len(wide))
        return real(layer, *args, **kwargs)

    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_config

    def remembered(*args, **kwargs):
        models.append(original(*args, **kwargs))
        return models[-1]

    monkeypatch.setattr(quantization, "quantize_linear", counting)
    monkeypatch.setattr(AutoModelForCausalLM, "from_config", remembered)
    builder.build_quantized(config, recipe, "cpu")
    assert most[0] == 1


@pytest.mark.slow
def test_the_built_model_trains_through_the_recipe(config, tmp_path) -> None:
    from datasets import Dataset
    from trl import SFTTrainer

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_models import placeholder_tokenizer
    from multigpu_job import synthetic_rows

    recipe = qlora_recipe(compute_dtype="float32", lora_dropout=0.0, learning_rate=5e-3)
    model = builder.build_quantized(config, recipe, "cpu")
    args = recipe.sft_config(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=16,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    data = Dataset.from_dict({"input_ids": synthetic_rows(6, 16, config.vocab_size)})
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=placeholder_tokenizer(), peft_config=recipe
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
