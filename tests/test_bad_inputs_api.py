"""The bad-input corpus, in process: the recipe API, the ``qlora:`` section through Axolotl's real
``load_cfg``, and the arguments ``recipe.sft_config()`` passes to TRL. Each input gets one line naming
the field, the value and a fix, and nothing is written; inputs that used to give a wrong result
(numeric strings, a single module name) now give the right one."""

from __future__ import annotations

import math
import textwrap

import pytest
import yaml
from bad_inputs import assert_one_line_error, snapshot

from qlora_plugin import QLoRAConfigError, qlora_recipe

NUMERIC_FIELDS = [
    "r",
    "lora_alpha",
    "lora_dropout",
    "learning_rate",
    "max_grad_norm",
    "warmup_ratio",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
]
PLUGIN = "qlora_plugin.axolotl.QLoRAPlugin"


# -- the recipe API ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", NUMERIC_FIELDS)
def test_a_non_finite_number_is_rejected_in_every_numeric_field(name, value) -> None:
    with pytest.raises(QLoRAConfigError) as error:
        qlora_recipe(**{name: value})
    assert error.value.field == name
    assert_one_line_error(str(error.value), name, value=repr(value))


@pytest.mark.parametrize(
    ("kwargs", "field", "value", "words"),
    [
        ({"learning_rate": "fast"}, "learning_rate", "'fast'", "such as 2e-4"),
        ({"r": "16x"}, "r", "'16x'", "positive integer"),
        ({"r": 2.5}, "r", "2.5", "whole number"),
        ({"r": "2.5"}, "r", "2.5", "whole number"),
        ({"target_modules": "q_proj,v_proj"}, "target_modules", "'q_proj,v_proj'", "['q_proj', 'v_proj']"),
        ({"target_modules": "q_proj v_proj"}, "target_modules", "'q_proj v_proj'", "as a list"),
        ({"target_modules": "q_proj("}, "target_modules", "'q_proj('", "regular expression"),
        ({"exclude_modules": "lm_head,o_proj"}, "exclude_modules", "'lm_head,o_proj'", "as a list"),
        ({"gradient_checkpointing": "offlaod"}, "gradient_checkpointing", "'offlaod'", "Did you mean 'offload'"),
        ({"fast_path": "no"}, "fast_path", "'no'", "True or False"),
        ({"compute_dtype": 16}, "compute_dtype", "16", "bfloat16"),
    ],
)
def test_bad_recipe_values_get_one_line(kwargs, field, value, words) -> None:
    with pytest.raises(QLoRAConfigError) as error:
        qlora_recipe(**kwargs)
    assert error.value.field == field and words in str(error.value)
    assert_one_line_error(str(error.value), field, value=value)


@pytest.mark.parametrize(
    ("target", "value"), [(["wq", "wv"], "['wq', 'wv']"), (r".*\.wq", r"'.*\\.wq'")], ids=["names", "pattern"]
)
def test_targets_that_match_nothing_on_a_model_name_the_layers_it_has(tiny_model_dir, target, value) -> None:
    with pytest.raises(QLoRAConfigError) as error:
        qlora_recipe(target_modules=target, model=tiny_model_dir)
    assert "q_proj" in error.value.fix and "matches no linear layer" in error.value.problem
    assert_one_line_error(str(error.value), "target_modules", value=value)


def test_numeric_strings_count_as_numbers_as_in_axolotl() -> None:
    recipe = qlora_recipe(learning_rate="2e-4", r="8", lora_alpha="16", num_train_epochs="3")
    assert (recipe.learning_rate, recipe.r, recipe.lora_alpha, recipe.num_train_epochs) == (2e-4, 8, 16, 3)
    assert qlora_recipe(r=16.0).r == 16 and isinstance(qlora_recipe(r=16.0).r, int)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("q_proj", {"q_proj"}),
        (r".*\.(q|v)_proj", {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"}),
        (["q_proj", "v_proj"], {"q_proj", "v_proj"}),
    ],
    ids=["one-name", "pattern", "list"],
)
def test_a_string_target_is_one_module_name_or_a_pattern_never_its_characters(tiny_model_dir, target, expected) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    recipe = qlora_recipe(target_modules=target, model=tiny_model_dir)
    assert set(recipe.target_modules) == expected
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), recipe)
    adapted = {name.removeprefix("base_model.model.") for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert {name.rsplit(".", 1)[-1] for name in adapted} == {name.rsplit(".", 1)[-1] for name in expected}
    assert len(adapted) == 2 * len({name.rsplit(".", 1)[-1] for name in expected})


def test_the_light_field_table_matches_the_recipe_and_transformers() -> None:
    import dataclasses

    from transformers.trainer_utils import SchedulerType

    from qlora_plugin.core.fields import DEFAULTS, SCHEDULERS
    from qlora_plugin.core.recipe import QLoRARecipe

    defaults = {f.name: f.default for f in dataclasses.fields(QLoRARecipe)}
    assert {name: defaults[name] for name in DEFAULTS} == DEFAULTS
    assert set(SCHEDULERS) == {kind.value for kind in SchedulerType}


# -- the qlora: section through Axolotl's load_cfg -------------------------------------------------


@pytest.fixture
def load_cfg(tiny_model_dir, tmp_path):
    """Axolotl's real load_cfg on a config with the plugin, ``extra`` YAML and a one-row dataset."""
    pytest.importorskip("axolotl")
    from axolotl.cli.config import load_cfg as axolotl_load_cfg

    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "say hi", "input": "", "output": "hi"}\n')

    def run(extra: str):
        config = {
            "base_model": str(tiny_model_dir),
            "datasets": [{"path": str(data), "type": "alpaca"}],
            "sequence_len": 64,
            "micro_batch_size": 2,
            "num_epochs": 1,
            "output_dir": str(tmp_path / "out"),
            "plugins": [PLUGIN],
            **yaml.safe_load(textwrap.dedent(extra)),
        }
        path = tmp_path / "config.yml"
        path.write_text(yaml.safe_dump(config))
        return axolotl_load_cfg(str(path))

    return run


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("{lora_dropout: .nan}", "qlora.lora_dropout", "nan"),
        ("{learning_rate: .inf}", "qlora.learning_rate", "inf"),
        ("{max_grad_norm: -.inf}", "qlora.max_grad_norm", "-inf"),
        ("{lora_alpha: .NaN}", "qlora.lora_alpha", "nan"),
        ("{warmup_ratio: .inf}", "qlora.warmup_ratio", "inf"),
        ("{num_train_epochs: .nan}", "qlora.num_train_epochs", "nan"),
        ("{learning_rate: fast}", "qlora.learning_rate", "'fast'"),
        ("{learning_rate: 2e-4x}", "qlora.learning_rate", "'2e-4x'"),
        ("{r: 16.5}", "qlora.r", "16.5"),
        ("{target_modules: q_proj v_proj}", "qlora.target_modules", "'q_proj v_proj'"),
        ("{target_modules: '[q_proj'}", "qlora.target_modules", "'[q_proj'"),
        ("{gradient_checkpointing: maybe}", "qlora.gradient_checkpointing", "'maybe'"),
        ("{double_quant: 'yes'}", "qlora.double_quant", "'yes'"),
        ("{warmup_ratio: 1.5}", "qlora.warmup_ratio", "1.5"),
        ("5", "qlora", "5"),
    ],
)
def test_a_bad_section_is_one_line_through_axolotls_load_cfg(load_cfg, tmp_path, section, field, value) -> None:
    with pytest.raises(QLoRAConfigError) as error:
        load_cfg(f"qlora: {section}")
    assert error.value.field == field
    assert_one_line_error(str(error.value), field, value=value)
    assert not (tmp_path / "out").exists()


def test_section_numbers_written_as_yaml_text_are_read_as_numbers(load_cfg) -> None:
    cfg = load_cfg("qlora: {learning_rate: 2e-4, r: '8', lora_alpha: 1e1}")
    assert (cfg.learning_rate, cfg.lora_r, cfg.lora_alpha) == (2e-4, 8, 10)


def test_a_single_target_name_in_the_section_is_that_module(load_cfg) -> None:
    cfg = load_cfg("qlora: {target_modules: q_proj}")
    assert cfg.lora_target_modules == ["q_proj"]


def test_native_lora_targets_give_way_to_the_section_whether_or_not_they_exist(load_cfg) -> None:
    for native in ("[wq, wv]", "[q_proj, v_proj]"):
        cfg = load_cfg(f"qlora: {{}}\nlora_target_modules: {native}")
        assert len(cfg.lora_target_modules) == 14  # every linear layer of the two-layer model: the section's 'auto'
    with pytest.raises(QLoRAConfigError) as error:
        load_cfg("qlora: {target_modules: [wq]}")
    assert "q_proj" in error.value.fix  # names that match nothing are an error where targets are chosen


# -- arguments passed through recipe.sft_config() ----------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field", "value", "words"),
    [
        ({"warmup_ratio": 0.1}, "warmup_ratio", "0.1", "warmup_steps=0.1"),
        ({"evaluation_strategy": "steps"}, "evaluation_strategy", "'steps'", "eval_strategy"),
        ({"max_seq_length": 512}, "max_seq_length", "512", "max_length"),
        ({"max_seq_lenght": 512}, "max_seq_lenght", "512", "Did you mean 'max_length'"),
        ({"learning_rate": "fast"}, "learning_rate", "'fast'", "positive number"),
        ({"learning_rate": math.nan}, "learning_rate", "nan", "finite"),
        ({"max_grad_norm": -1}, "max_grad_norm", "-1", "0 turns clipping off"),
        ({"num_train_epochs": 0}, "num_train_epochs", "0", "positive"),
        ({"per_device_train_batch_size": 2.5}, "per_device_train_batch_size", "2.5", "integer"),
        ({"warmup_steps": -5}, "warmup_steps", "-5", "fraction"),
        ({"packing": "yes"}, "packing", "'yes'", "True or False"),
        ({"seed": "7"}, "seed", "'7'", "integer"),
        ({"model_init_kwargs": {"load_in_8bit": True}}, "model_init_kwargs['load_in_8bit']", "True", "4 bits"),
        ({"model_init_kwargs": {"load_in_4bit": True}}, "model_init_kwargs['load_in_4bit']", "True", "4 bits"),
        ({"model_init_kwargs": "dtype=bf16"}, "model_init_kwargs", "'dtype=bf16'", "dict"),
    ],
)
def test_sft_config_arguments_are_checked_before_trl_sees_them(tmp_path, kwargs, field, value, words) -> None:
    out = tmp_path / "run"
    with pytest.raises(QLoRAConfigError) as error:
        qlora_recipe().sft_config(output_dir=str(out), report_to="none", **kwargs)
    assert error.value.field == field and words in str(error.value)
    assert_one_line_error(str(error.value), field, value=value)
    assert snapshot(tmp_path) == {}


def test_an_8bit_quantization_config_is_refused(tmp_path) -> None:
    from transformers import BitsAndBytesConfig

    with pytest.raises(QLoRAConfigError) as error:
        qlora_recipe().sft_config(
            output_dir=str(tmp_path), model_init_kwargs={"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
        )
    assert_one_line_error(str(error.value), "quantization_config", value="load_in_8bit=True")


def test_good_sft_config_arguments_still_pass_and_win(tmp_path) -> None:
    config = qlora_recipe().sft_config(
        output_dir=str(tmp_path),
        learning_rate=1e-3,
        warmup_steps=0.1,
        seed=3,
        report_to="none",
        model_init_kwargs={"attn_implementation": "eager"},
    )
    assert (config.learning_rate, config.warmup_steps, config.seed) == (1e-3, 0.1, 3)
    assert config.model_init_kwargs["attn_implementation"] == "eager"
