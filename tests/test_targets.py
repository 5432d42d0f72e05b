"""Target discovery: the exact modules that get adapters, per architecture."""

from __future__ import annotations

import pytest
from architectures import build, configs

from qlora_plugin import QLoRAConfigError, qlora_recipe

LLAMA_LIKE = {f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
    f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")
}
EXPECTED = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "gemma": LLAMA_LIKE,  # lm_head is tied to the embeddings and is skipped
    "phi3": {
        "model.layers.0.self_attn.qkv_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_up_proj",
        "model.layers.0.mlp.down_proj",
    },
    "gpt2": {f"transformer.h.0.{p}" for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")},
    "gpt_neox": {
        f"gpt_neox.layers.0.{p}"
        for p in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    },
    # transformers 5 keeps Mixtral's experts as fused parameters, not linear
    # layers; the router (mlp.gate) is skipped.
    "mixtral": {f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    # the shared expert is a plain MLP; its scalar gate (shared_expert_gate) and the router are skipped
    "qwen2_moe": {f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    | {f"model.layers.0.mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")},
    # only the language model: no vision tower, no multimodal projector
    "llava": {name.replace("model.", "model.language_model.", 1) for name in LLAMA_LIKE},
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_discovery_names_exactly_the_expected_modules(arch: str) -> None:
    model = build(arch)
    assert set(qlora_recipe(model=model).target_modules) == EXPECTED[arch]


@pytest.mark.parametrize("arch", sorted(set(EXPECTED) - {"mixtral"}))
def test_peft_resolves_the_unbound_recipe_to_the_same_modules(arch: str) -> None:
    """A recipe that never saw the model hands PEFT "all-linear" plus exclusions:
    PEFT must wrap exactly what discovery names."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    model = get_peft_model(build(arch), qlora_recipe())
    wrapped = {name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == EXPECTED[arch]


def test_unbound_recipe_on_mixtral_asks_to_discover_first() -> None:
    """PEFT maps "all-linear" on Mixtral to the fused experts and the router; the recipe
    refuses that with the fix, and the bound recipe adapts what the rule says: the linear
    layers, and the experts (never the router) through target_parameters."""
    from peft import get_peft_model

    with pytest.raises(QLoRAConfigError, match=r"model=<path or model>"):
        get_peft_model(build("mixtral"), qlora_recipe())
    model = get_peft_model(build("mixtral"), qlora_recipe(model=build("mixtral")))
    assert set(model.peft_config["default"].target_parameters) == {
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.down_proj",
    }


def test_discovery_from_a_path_reads_only_the_config(tmp_path) -> None:
    configs()["qwen2"].save_pretrained(tmp_path)  # config.json only, no weights
    assert set(qlora_recipe(model=str(tmp_path)).target_modules) == LLAMA_LIKE


def test_exclusions_remove_discovered_modules() -> None:
    recipe = qlora_recipe(model=build("llama"), exclude_modules=["down_proj", "o_proj"])
    assert set(recipe.target_modules) == LLAMA_LIKE - {
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.o_proj",
    }


def test_named_targets_that_match_nothing_list_the_linear_layers() -> None:
    with pytest.raises(QLoRAConfigError) as error:
        qlora_recipe(model=build("gpt_neox"), target_modules=["q_proj", "dense"])
    message = str(error.value)
    assert error.value.field == "target_modules"
    assert "['q_proj']" in message
    assert "query_key_value" in message and "dense_h_to_4h" in message


def test_a_path_without_a_model_config_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(QLoRAConfigError, match="holds no config.json"):
        qlora_recipe(model=str(tmp_path))
