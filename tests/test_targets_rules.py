"""The target rules (core/targets.py) on layer names and one tiny model: which layers explicit
names and patterns select, and what an error says when they select nothing. Pinned where mutation
testing found the messages and the name handling loose (docs/mutation.md)."""

from __future__ import annotations

import pytest
from architectures import build

from qlora_plugin import QLoRAConfigError
from qlora_plugin.core.targets import (
    check_targets_exist,
    named_targets,
    output_head_names,
    rule_targets,
    user_excluded,
)

LINEAR = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.1.self_attn.q_proj",
    "lm_head",
]


def test_names_select_every_layer_whose_last_parts_they_are_in_model_order() -> None:
    assert named_targets(LINEAR, ["q_proj"], "Tiny") == [LINEAR[0], LINEAR[3]]
    assert named_targets(LINEAR, {"down_proj", "self_attn.v_proj"}, "Tiny") == [
        LINEAR[1],
        LINEAR[2],
    ]
    assert named_targets(LINEAR, ["model.layers.1.self_attn.q_proj"], "Tiny") == [LINEAR[3]]
    with pytest.raises(QLoRAConfigError):
        named_targets(LINEAR, ["proj"], "Tiny")  # a part of a name is no name


def test_a_pattern_must_match_whole_names() -> None:
    assert named_targets(LINEAR, r".*\.q_proj", "Tiny") == [LINEAR[0], LINEAR[3]]
    assert named_targets(LINEAR, r"model\.layers\.1\..*", "Tiny") == [LINEAR[3]]


def test_a_pattern_that_matches_nothing_names_the_rule_and_the_layers_there_are() -> None:
    with pytest.raises(QLoRAConfigError) as error:
        named_targets(LINEAR, "q_proj.*", "TinyForCausalLM")
    assert (error.value.field, error.value.value) == ("target_modules", "q_proj.*")
    assert error.value.problem == (
        "as a regular expression matches no linear layer of TinyForCausalLM (it must match the whole name, "
        "e.g. model.layers.0.self_attn.q_proj)"
    )
    assert error.value.fix == (
        "use a list of the names it has, e.g. ['down_proj', 'lm_head'] (all: ['down_proj', 'lm_head', 'q_proj', "
        "'v_proj']), a pattern such as '.*\\.(q_proj|v_proj)', or 'auto'"
    )


def test_names_that_match_nothing_are_listed_with_the_layers_there_are() -> None:
    with pytest.raises(QLoRAConfigError) as error:
        named_targets(LINEAR, ["wv", "q_proj", "wq"], "TinyForCausalLM")
    assert (error.value.field, error.value.value) == ("target_modules", ["wq", "wv"])
    assert error.value.problem == "matches no linear layer of TinyForCausalLM"
    assert error.value.fix == (
        "use names from the linear layers it has: ['down_proj', 'lm_head', 'q_proj', 'v_proj'], "
        "or target_modules='auto'"
    )


def test_the_error_names_the_models_class() -> None:
    with pytest.raises(QLoRAConfigError) as error:
        check_targets_exist(build("gpt_neox"), ["q_proj"])
    assert error.value.problem == "matches no linear layer of GPTNeoXForCausalLM"
    assert check_targets_exist(build("gpt_neox"), ["dense"]) == ["gpt_neox.layers.0.attention.dense"]


def test_the_rule_leaves_out_heads_routers_and_vision_parts_by_name() -> None:
    names = [
        "model.layers.0.mlp.gate",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.shared_expert_gate",
        "model.vision_tower.blocks.0.fc1",
        "model.multi_modal_projector",
        "embed_out",
        "model.layers.0.self_attn.o_proj",
        "tied.head",
    ]
    assert rule_targets(names, {"tied.head"}) == [
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.self_attn.o_proj",
    ]


@pytest.mark.parametrize(
    ("exclude", "name", "left_out"),
    [
        (None, "model.layers.0.mlp.down_proj", False),
        ([], "model.layers.0.mlp.down_proj", False),
        (["down_proj"], "model.layers.0.mlp.down_proj", True),
        (["mlp.down_proj"], "model.layers.0.mlp.down_proj", True),
        (["own_proj"], "model.layers.0.mlp.down_proj", False),
        (r".*\.layers\.0\..*", "model.layers.0.mlp.down_proj", True),
        (
            r"layers\.0",
            "model.layers.0.mlp.down_proj",
            False,
        ),  # a pattern matches the whole name
    ],
)
def test_user_exclusions_are_names_or_a_whole_name_pattern(exclude, name, left_out) -> None:
    assert user_excluded(name, exclude) is left_out


def test_excluding_every_discovered_layer_is_an_error_with_a_fix() -> None:
    from qlora_plugin import qlora_recipe

    everything = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with pytest.raises(QLoRAConfigError) as error:
        qlora_recipe(model=build("llama"), exclude_modules=everything)
    assert (error.value.field, error.value.value) == ("exclude_modules", everything)  # blamed on what excluded them
    assert error.value.problem.startswith("leaves no layer to adapt: it excludes all 7 linear layers the rule found")
    assert "exclude fewer modules" in error.value.fix


def test_a_module_without_output_embeddings_has_no_head() -> None:
    import torch

    assert output_head_names(torch.nn.Sequential(torch.nn.Linear(2, 2))) == set()
    model = build("llama")
    assert output_head_names(model) == {"lm_head"}
