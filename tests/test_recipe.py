"""The recipe: presets, overrides, conversions to the real library classes, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_plugin import QLoRAConfigError, QLoRARecipe, qlora_recipe


def test_default_recipe_is_qlora() -> None:
    recipe = qlora_recipe()
    assert (recipe.quant_type, recipe.double_quant, recipe.optimizer) == ("nf4", True, "paged_adamw_32bit")
    assert (recipe.r, recipe.lora_alpha, recipe.lora_dropout) == (16, 32, 0.05)
    assert recipe.recipe_fields()["target_modules"] == "auto"
    assert recipe.gradient_checkpointing and recipe.max_grad_norm == 0.3


def test_paper_preset_matches_the_qlora_paper() -> None:
    fields = qlora_recipe("paper").recipe_fields()
    expected = dict(
        r=64,
        lora_alpha=16,
        lora_dropout=0.1,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        warmup_ratio=0.03,
        max_grad_norm=0.3,
        optimizer="paged_adamw_32bit",
        target_modules="auto",
    )
    assert {key: fields[key] for key in expected} == expected


def test_finlora_preset_matches_the_finlora_entry() -> None:
    recipe = qlora_recipe("finlora-r4")
    assert (recipe.r, recipe.learning_rate, recipe.num_train_epochs) == (4, 1e-4, 4)
    assert (recipe.per_device_train_batch_size, recipe.gradient_accumulation_steps) == (8, 2)
    assert recipe.quant_type == "nf4"


def test_overrides_apply_on_top_of_a_preset_and_aliases_map_to_peft_names() -> None:
    recipe = qlora_recipe("paper", r=32, alpha=64, dropout=0.0, quant_type="fp4")
    assert (recipe.r, recipe.lora_alpha, recipe.lora_dropout, recipe.quant_type) == (32, 64, 0.0, "fp4")
    assert recipe.learning_rate == 2e-4 and recipe.preset == "paper"


def test_bnb_config_equals_the_hand_written_one() -> None:
    from transformers import BitsAndBytesConfig

    expected = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.uint8,
    )
    assert qlora_recipe().bnb_config(device="cpu").to_dict() == expected.to_dict()
    fsdp = qlora_recipe(quant_storage="bf16", compute_dtype="float16").bnb_config(device="cpu")
    assert fsdp.bnb_4bit_quant_storage == torch.bfloat16 and fsdp.bnb_4bit_compute_dtype == torch.float16


def test_lora_config_equals_the_hand_written_one() -> None:
    from peft import LoraConfig

    recipe = qlora_recipe(
        r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"], use_rslora=True, use_dora=True
    )
    expected = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=["q_proj", "v_proj"],
        use_rslora=True,
        use_dora=True,
        task_type="CAUSAL_LM",
    )
    assert recipe.lora_config().to_dict() == expected.to_dict()
    assert type(recipe.lora_config()) is LoraConfig


def test_training_args_are_accepted_by_transformers(tmp_path) -> None:
    from transformers import TrainingArguments

    settings = qlora_recipe("finlora-r4").training_args(device="cpu")
    args = TrainingArguments(output_dir=str(tmp_path), **settings)
    assert args.optim == "paged_adamw_32bit" and args.max_grad_norm == 0.3
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert (args.num_train_epochs, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 8, 2)
    assert args.warmup_steps == 0.03 and not args.bf16 and not args.fp16


def test_gpu_precision_follows_the_compute_dtype(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # e.g. an H100
    bf16 = qlora_recipe().training_args(device="cuda")
    assert bf16["bf16"] and not bf16["fp16"]
    fp16 = qlora_recipe(compute_dtype="float16").training_args(device="cuda")
    assert fp16["fp16"] and not fp16["bf16"]


def test_sft_config_picks_precision_from_the_device_and_loads_in_4bit(tmp_path) -> None:
    config = qlora_recipe().sft_config(output_dir=str(tmp_path))
    assert not config.bf16 and not config.fp16  # CPU: TRL would refuse bf16
    quant = config.model_init_kwargs["quantization_config"]
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert config.optim == "paged_adamw_32bit" and config.learning_rate == 2e-4


def test_sft_config_reports_what_the_caller_replaced(tmp_path, caplog) -> None:
    with caplog.at_level("INFO", logger="qlora_plugin"):
        config = qlora_recipe().sft_config(output_dir=str(tmp_path), optim="adamw_torch", max_grad_norm=1.0)
    assert config.optim == "adamw_torch"
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1
    assert "optim=adamw_torch" in warning[0] and "max_grad_norm=1.0" in warning[0]
    assert "gradient_checkpointing=True" in warning[0]  # the parts still in effect are named too


def test_saved_adapter_config_is_plain_lora_and_the_recipe_sits_beside_it(tmp_path) -> None:
    from peft import LoraConfig, PeftConfig

    recipe = qlora_recipe("paper", r=8)
    recipe.save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is LoraConfig and loaded.r == 8
    assert "optimizer" not in json.loads((tmp_path / "adapter_config.json").read_text())
    # no model built with it: the record is the recipe's, and says so
    assert json.loads((tmp_path / "qlora_recipe.json").read_text()) == {
        **recipe.recipe_fields(),
        "recorded_from": "recipe",
    }


def test_replace_keeps_everything_else() -> None:
    recipe = qlora_recipe("paper", exclude_modules=["o_proj"]).replace(r=8)
    assert recipe.r == 8 and recipe.lora_alpha == 16 and recipe.recipe_fields()["exclude_modules"] == ["o_proj"]


@pytest.mark.parametrize(
    ("kwargs", "field", "hint"),
    [
        ({"r": 0}, "r", "positive integer"),
        ({"r": 2.5}, "r", "integer"),
        ({"r": True}, "r", "integer"),
        ({"lora_dropout": 1.0}, "lora_dropout", "[0, 1)"),
        ({"dropout": -0.1}, "lora_dropout", "[0, 1)"),
        ({"lora_alpha": "big"}, "lora_alpha", "number"),
        ({"quant_type": "nf3"}, "quant_type", "['nf4', 'fp4']"),
        ({"compute_dtype": "bfloat8"}, "compute_dtype", "Did you mean 'bfloat16'"),
        ({"quant_storage": "int4"}, "quant_storage", "uint8"),
        ({"optimizer": "paged_adamw"}, "optimizer", "Did you mean 'paged_adamw_8bit'"),
        ({"lr_scheduler_type": "cosin"}, "lr_scheduler_type", "Did you mean 'cosine'"),
        ({"double_quant": "yes"}, "double_quant", "True or False"),
        ({"target_modules": []}, "target_modules", "q_proj"),
        ({"learning_rate": 0}, "learning_rate", "positive"),
        ({"rank": 8}, "rank", "not a recipe field"),
        ({"alpha": 8, "lora_alpha": 8}, "alpha", "given twice"),
    ],
)
def test_bad_input_names_field_value_and_fix(kwargs, field, hint) -> None:
    with pytest.raises(QLoRAConfigError) as error:
        qlora_recipe(**kwargs)
    assert error.value.field == field
    assert hint in str(error.value)
    assert "Fix:" in str(error.value)


def test_unknown_preset_suggests_the_nearest() -> None:
    with pytest.raises(QLoRAConfigError, match=r"Did you mean 'paper'") as error:
        qlora_recipe("papr")
    assert error.value.field == "preset" and "finlora-r4" in str(error.value)


def test_a_compute_dtype_the_gpu_cannot_run_is_refused(monkeypatch) -> None:
    from qlora_plugin.core.device import resolve_compute_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    with pytest.raises(QLoRAConfigError, match="cannot compute in bfloat16"):
        resolve_compute_dtype("bfloat16", "cuda")
    assert resolve_compute_dtype("auto", "cuda") == torch.float16


def test_the_recipe_is_a_peft_config_so_trl_accepts_it() -> None:
    from peft import PeftConfig

    assert isinstance(qlora_recipe(), PeftConfig) and isinstance(qlora_recipe(), QLoRARecipe)


def test_importing_the_package_loads_no_heavy_library() -> None:
    import subprocess
    import sys

    heavy = "('torch', 'transformers', 'peft', 'trl')"
    code = f"import sys, qlora_plugin; print(sorted(m for m in {heavy} if m in sys.modules))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )


def test_replace_and_resolve_keep_peft_fields_the_recipe_does_not_own(tiny_model_dir):
    from qlora_plugin.core.recipe import QLoRARecipe

    recipe = QLoRARecipe(
        bias="lora_only", modules_to_save=["lm_head"], rank_pattern={"q_proj": 8}, init_lora_weights="gaussian"
    )
    for copy in (recipe.replace(r=8), recipe.resolve(tiny_model_dir)):
        assert (copy.bias, copy.modules_to_save, copy.rank_pattern, copy.init_lora_weights) == (
            "lora_only",
            ["lm_head"],
            {"q_proj": 8},
            "gaussian",
        )
    explicit = QLoRARecipe(target_modules=["q_proj", "v_proj"], layers_to_transform=[0], layers_pattern="layers")
    assert explicit.replace(lora_alpha=8).layers_to_transform == [0]
    assert recipe.replace(r=8).modules_to_save is not recipe.modules_to_save  # copied, not shared


def test_every_recipe_field_has_help_and_its_choices():
    import dataclasses

    from qlora_plugin.core.fields import CHOICES, RECIPE_FIELDS
    from qlora_plugin.core.recipe import QLoRARecipe

    fields = {f.name: f for f in dataclasses.fields(QLoRARecipe)}
    for name in RECIPE_FIELDS:
        assert fields[name].metadata.get("help"), name
        assert fields[name].metadata.get("choices") == CHOICES.get(name), name
