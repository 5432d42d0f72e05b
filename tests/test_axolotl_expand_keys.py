"""The ``qlora:`` section as Axolotl keys, function by function (integrations/axolotl/section.py and
integrations/axolotl/expand.py): the exact keys a recipe becomes, how they are written over a
config and what each replacement says. test_axolotl_config.py runs the same code through Axolotl's
load_cfg; these pin the details it does not look at (docs/mutation.md)."""

from __future__ import annotations

import pytest

from qlora_plugin import QLoRAConfigError
from qlora_plugin.build.context import make_context
from qlora_plugin.core.recipe import qlora_recipe
from qlora_plugin.integrations.axolotl.expand import (
    LORA_KERNELS,
    apply_keys,
    keep_lora_kernels_on_cuda,
    native_keys,
    recipe_from_section,
)
from qlora_plugin.integrations.axolotl.section import (
    PLUGIN,
    in_section,
    names_the_plugin,
    spec_from_section,
)

DEFAULT_ON_CPU = {
    "adapter": "qlora",
    "load_in_4bit": True,
    "load_in_8bit": False,
    "bnb_config_kwargs": {
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_compute_dtype": "bfloat16",
    },
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "peft_use_rslora": False,
    "peft_use_dora": False,
    "peft_autocast_adapter_dtype": False,
    "optimizer": "paged_adamw_32bit",
    "learning_rate": 2e-4,
    "max_grad_norm": 0.3,
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.03,
    "gradient_checkpointing": True,
    "gradient_checkpointing_kwargs": {"use_reentrant": False},
    "bf16": False,
    "fp16": False,
}


# -- the section -----------------------------------------------------------------------------------


def test_an_absent_or_empty_section_is_the_default_recipe() -> None:
    assert spec_from_section(None).recipe_fields() == spec_from_section({}).recipe_fields()
    assert spec_from_section(None).preset == "default" and spec_from_section({}).r == 16


def test_the_section_names_its_preset_and_overrides() -> None:
    spec = spec_from_section({"preset": "paper", "r": 8, "alpha": 4})
    assert (spec.preset, spec.r, spec.lora_alpha, spec.lora_dropout) == (
        "paper",
        8,
        4,
        0.1,
    )
    recipe = recipe_from_section({"preset": "finlora-r4"})
    assert (recipe.preset, recipe.r, recipe.num_train_epochs) == ("finlora-r4", 4, 4)


@pytest.mark.parametrize("section", [5, "r: 8", ["r", 8]])
def test_a_section_that_is_no_mapping_is_refused(section) -> None:
    with pytest.raises(QLoRAConfigError) as error:
        spec_from_section(section)
    assert (error.value.field, error.value.value) == ("qlora", section)
    assert error.value.problem == "must be a mapping of recipe fields"
    assert error.value.fix == "write e.g. `qlora: {preset: paper, r: 32}`"


def test_errors_in_the_section_name_the_field_as_the_yaml_spells_it() -> None:
    with pytest.raises(QLoRAConfigError) as error:
        spec_from_section({"r": 0})
    assert (error.value.field, error.value.value, error.value.problem) == (
        "qlora.r",
        0,
        "is out of range",
    )
    assert error.value.fix == "set r to a positive integer such as 16"
    assert isinstance(error.value.__cause__, QLoRAConfigError) and error.value.__cause__.field == "r"
    moved = in_section(QLoRAConfigError("lora_dropout", 2, "is out of range", "set it lower"))
    assert str(moved) == "qlora.lora_dropout=2: is out of range. Fix: set it lower"


def test_the_plugin_is_named_by_either_path_in_a_plugins_list() -> None:
    assert names_the_plugin([PLUGIN])
    assert names_the_plugin(["other.Plugin", "qlora_plugin.integrations.axolotl.plugin.QLoRAPlugin"])
    assert not names_the_plugin(["other.Plugin"])
    assert not names_the_plugin(PLUGIN)  # a string is no plugins list
    assert not names_the_plugin(None) and not names_the_plugin([])


# -- the keys --------------------------------------------------------------------------------------


def keys_on(recipe, device: str) -> dict:
    """The Axolotl keys of ``recipe`` in a run on ``device`` (no launch, no sharding)."""
    return native_keys(recipe, make_context(recipe, device=device))


def test_the_default_recipe_on_a_cpu_is_exactly_these_keys() -> None:
    assert keys_on(qlora_recipe(), "cpu") == DEFAULT_ON_CPU


def test_optional_settings_explicit_targets_and_the_switches_reach_their_keys() -> None:
    recipe = qlora_recipe(
        "finlora-r4",
        target_modules={"v_proj", "q_proj"},
        fast_path=False,
        gradient_checkpointing=False,
        compute_dtype="float16",
        use_rslora=True,
        use_dora=True,
        double_quant=False,
        quant_type="fp4",
        lr_scheduler_type="constant",
        optimizer="adamw_torch",
    )
    keys = keys_on(recipe, "cuda")
    assert keys == {
        **DEFAULT_ON_CPU,
        "bnb_config_kwargs": {
            "bnb_4bit_quant_type": "fp4",
            "bnb_4bit_use_double_quant": False,
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_compute_dtype": "float16",
        },
        "lora_r": 4,
        "learning_rate": 1e-4,
        "peft_use_rslora": True,
        "peft_use_dora": True,
        "peft_autocast_adapter_dtype": True,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "gradient_checkpointing": False,
        "gradient_checkpointing_kwargs": None,
        "fp16": True,
        "num_epochs": 4,
        "micro_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "lora_target_modules": ["q_proj", "v_proj"],
    }


def test_a_target_pattern_is_passed_on_as_a_pattern_and_offload_checkpointing_is_on() -> None:
    keys = keys_on(qlora_recipe(target_modules=r".*q_proj", gradient_checkpointing="offload"), "cpu")
    assert keys["lora_target_modules"] == ".*q_proj"
    assert keys["gradient_checkpointing"] is True and keys["gradient_checkpointing_kwargs"] == {"use_reentrant": False}


def test_the_compute_dtype_and_precision_follow_the_device_asked_for_not_the_one_here() -> None:
    from qlora_plugin.core.device import (
        precision_flags,
        resolve_compute_dtype,
        training_device,
    )

    other = "cpu" if training_device() == "cuda" else "cuda"  # on a CPU: 'auto' on CUDA without bf16 is float16
    dtype = resolve_compute_dtype("auto", other)
    keys = keys_on(qlora_recipe(), other)
    assert keys["bnb_config_kwargs"]["bnb_4bit_compute_dtype"] == str(dtype).removeprefix("torch.")
    assert {"bf16": keys["bf16"], "fp16": keys["fp16"]} == precision_flags(dtype, other)


def test_native_values_are_replaced_with_one_warning_each_and_agreeing_ones_silently() -> None:
    cfg = {
        "lora_r": 8,
        "lora_alpha": 32,
        "bf16": "auto",
        "optimizer": None,
        "bnb_config_kwargs": {
            "bnb_4bit_quant_type": "fp4",
            "bnb_4bit_compute_dtype": "torch.bfloat16",
            "extra": 1,
        },
        "lora_target_modules": ["v_proj", "q_proj"],
        "keep": "me",
    }
    keys = {
        "lora_r": 16,
        "lora_alpha": 32,
        "bf16": False,
        "optimizer": "paged_adamw_32bit",
        "bnb_config_kwargs": {
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_compute_dtype": "bfloat16",
        },
        "lora_target_modules": ["q_proj", "v_proj"],
    }
    warnings = apply_keys(cfg, keys)
    assert warnings == [
        "qlora section: `lora_r: 8` in the config is replaced by 16",
        "qlora section: `bnb_config_kwargs.bnb_4bit_quant_type: 'fp4'` in the config is replaced by 'nf4'",
    ]
    assert cfg == {
        **keys,
        "bnb_config_kwargs": {
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_compute_dtype": "bfloat16",
            "extra": 1,
        },
        "keep": "me",
    }


def test_a_nested_key_absent_from_the_config_is_created() -> None:
    cfg: dict = {"bnb_config_kwargs": None}
    assert apply_keys(cfg, {"bnb_config_kwargs": {"bnb_4bit_quant_type": "nf4"}}) == []
    assert cfg == {"bnb_config_kwargs": {"bnb_4bit_quant_type": "nf4"}}


def test_replaced_targets_say_where_targets_are_chosen() -> None:
    cfg = {"lora_target_modules": ["wq"]}
    assert apply_keys(cfg, {"lora_target_modules": ["q_proj"]}) == [
        "qlora section: `lora_target_modules: ['wq']` in the config is replaced by ['q_proj'] "
        "(the section's targets win; to choose them, set qlora.target_modules)"
    ]


def test_native_keys_the_recipe_says_differently_are_dropped_when_set() -> None:
    cfg = {"warmup_steps": 10, "lora_target_linear": True, "lora_exclude_modules": None}
    assert apply_keys(cfg, {}) == [
        "qlora section: `warmup_steps: 10` in the config is replaced by None",
        "qlora section: `lora_target_linear: True` in the config is replaced by None",
    ]
    assert cfg == {
        "warmup_steps": None,
        "lora_target_linear": None,
        "lora_exclude_modules": None,
    }
    untouched = {"warmup_steps": 0}
    assert apply_keys(untouched, {}) == [] and untouched == {"warmup_steps": 0}


@pytest.mark.parametrize(
    ("native", "ours", "agrees"),
    [
        ("auto", True, True),
        ("auto", False, True),
        ("auto", "bfloat16", False),
        ("torch.float16", "float16", True),
        ("float16", "bfloat16", False),
        (["b", "a"], ("a", "b"), True),
        (["a"], ["a", "b"], False),
        (16, 16, True),
        (16.0, 16, True),
        (8, 16, False),
        ("ab", ["a", "b"], False),
        (["a", "b"], "ab", False),
    ],
)
def test_what_counts_as_the_same_value(native, ours, agrees) -> None:
    cfg = {"key": native}
    assert apply_keys(cfg, {"key": ours}) == (
        [] if agrees else [f"qlora section: `key: {native!r}` in the config is replaced by {ours!r}"]
    )


def test_lora_kernels_are_turned_off_on_a_cpu_with_a_warning_for_each_that_was_on() -> None:
    cfg = {"lora_qkv_kernel": True, "lora_o_kernel": False, "lora_mlp_kernel": True}
    assert keep_lora_kernels_on_cuda(cfg, "cpu") == [
        "qlora section: `lora_qkv_kernel: True` in the config is replaced by False (they need CUDA)",
        "qlora section: `lora_mlp_kernel: True` in the config is replaced by False (they need CUDA)",
    ]
    assert cfg == dict.fromkeys(LORA_KERNELS, False)


def test_lora_kernels_are_left_as_set_on_cuda() -> None:
    cfg = {"lora_qkv_kernel": True}
    assert keep_lora_kernels_on_cuda(cfg, "cuda") == [] and cfg == {"lora_qkv_kernel": True}
