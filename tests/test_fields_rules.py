"""The light field checks (core/fields.py) pinned where mutation testing found them loose
(docs/mutation.md): the dataclass metadata, numeric strings, the module-name rules and their
messages, and the RecipeSpec views. No model, no PEFT: these run in milliseconds."""

from __future__ import annotations

import pytest

from qlora_plugin import QLoRAConfigError
from qlora_plugin.core.fields import (
    CHOICES,
    HELP,
    QUANT_TYPES,
    RecipeSpec,
    check_fields,
    metadata,
    recipe_spec,
)


def test_metadata_is_the_help_and_the_choices_where_a_field_has_them() -> None:
    assert metadata("quant_type") == {
        "help": HELP["quant_type"],
        "choices": QUANT_TYPES,
    }
    assert metadata("r") == {"help": HELP["r"]}  # no choices key for a free field
    for name in CHOICES:
        assert metadata(name)["choices"] == CHOICES[name]


@pytest.mark.parametrize("text", ["32", "+32", " 32 "])
def test_a_whole_numeric_string_is_read_as_an_int_even_in_a_float_field(text) -> None:
    # lora_alpha takes floats; "32" must still stay the integer 32 (adapter_config.json says 32, not 32.0)
    spec = recipe_spec(lora_alpha=text)
    assert spec.lora_alpha == 32 and type(spec.lora_alpha) is int


def test_a_negative_numeric_string_is_read_as_its_number() -> None:
    with pytest.raises(QLoRAConfigError) as error:
        recipe_spec(r="-8")
    assert error.value.value == -8 and error.value.problem == "is out of range"


def test_text_that_is_no_number_says_so() -> None:
    with pytest.raises(QLoRAConfigError) as error:
        recipe_spec(learning_rate="fast")
    assert error.value.problem == "must be a number, and this text is not one"
    assert error.value.fix == "set learning_rate to a positive number such as 2e-4"
    with pytest.raises(QLoRAConfigError) as error:
        recipe_spec(r="many")
    assert error.value.problem == "must be an integer, and this text is not one"


@pytest.mark.parametrize(
    ("name", "example"),
    [("target_modules", "['q_proj', 'v_proj']"), ("exclude_modules", "['lm_head']")],
)
def test_a_module_value_of_the_wrong_type_gets_that_fields_own_example(name, example) -> None:
    with pytest.raises(QLoRAConfigError) as error:
        recipe_spec(**{name: 5})
    assert error.value.fix == f"e.g. {name}={example}"
    with pytest.raises(QLoRAConfigError) as error:
        recipe_spec(**{name: "q_proj("})
    assert error.value.fix == f"give a list of module names such as {example}, or a valid pattern"


def test_several_names_in_one_string_are_shown_as_the_list_they_mean() -> None:
    with pytest.raises(QLoRAConfigError) as error:
        recipe_spec(target_modules="q_proj, v_proj")
    assert error.value.problem == "is several module names in one string"
    assert error.value.fix == (
        "write them as a list: target_modules=['q_proj', 'v_proj'] (YAML: target_modules: [q_proj, v_proj])"
    )


@pytest.mark.parametrize("value", [["q_proj", "  "], ["q_proj", ""], ["q_proj", 5], [None]])
def test_a_list_with_a_blank_or_non_text_name_is_refused(value) -> None:
    with pytest.raises(QLoRAConfigError) as error:
        recipe_spec(target_modules=value)
    assert error.value.field == "target_modules"


def test_a_set_of_names_becomes_a_sorted_list() -> None:
    names = {f"proj_{letter}" for letter in "hgfedcba"}
    checked = check_fields({**RecipeSpec().recipe_fields(), "target_modules": names})
    assert checked["target_modules"] == sorted(names)


def test_a_spec_names_the_missing_attribute() -> None:
    spec = RecipeSpec()
    with pytest.raises(AttributeError, match="no_such_field"):
        _ = spec.no_such_field
    assert getattr(spec, "no_such_field", "absent") == "absent"


@pytest.mark.parametrize("auto", ["auto", "all-linear"])
def test_automatic_targets_are_reported_as_auto(auto) -> None:
    spec = recipe_spec(target_modules=auto)
    assert spec.targets_are_auto
    assert spec.recipe_fields()["target_modules"] == "auto"
    assert recipe_spec(target_modules=["q_proj"]).recipe_fields()["target_modules"] == ["q_proj"]


@pytest.mark.parametrize(("alias", "name"), [("bf16", "bfloat16"), ("fp16", "float16"), ("half", "float16")])
def test_dtype_aliases_are_read_as_their_names(alias, name) -> None:
    spec = recipe_spec(compute_dtype=alias, quant_storage=alias)
    assert (spec.compute_dtype, spec.quant_storage) == (name, name)


def test_a_list_of_names_keeps_its_order() -> None:
    assert recipe_spec(target_modules=["v_proj", " q_proj "]).target_modules == [
        "v_proj",
        "q_proj",
    ]


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        (
            "target_modules",
            "must be 'auto', a module name, a regular expression, or a non-empty list of module names",
        ),
        (
            "exclude_modules",
            "must be a module name, a regular expression, or a list of module names",
        ),
    ],
)
def test_a_module_value_of_the_wrong_type_says_what_the_field_takes(name, problem) -> None:
    with pytest.raises(QLoRAConfigError) as error:
        recipe_spec(**{name: 5})
    assert (error.value.field, error.value.value, error.value.problem) == (
        name,
        5,
        problem,
    )


def test_a_bad_checkpointing_value_says_what_each_choice_does() -> None:
    with pytest.raises(QLoRAConfigError) as error:
        recipe_spec(gradient_checkpointing="offlaod")
    assert error.value.problem == "must be true, false or 'offload'. Did you mean 'offload'?"
    assert error.value.fix == (
        "set gradient_checkpointing=True (recompute, less memory), False (fastest) or 'offload' (least memory)"
    )


def test_a_switch_that_is_no_boolean_names_the_type_it_got() -> None:
    with pytest.raises(QLoRAConfigError) as error:
        recipe_spec(double_quant="yes")
    assert error.value.problem == "must be true or false, not str"
    assert error.value.fix == "set double_quant=True or False (true / false in YAML)"


def test_an_unknown_choice_shows_the_value_and_the_choices() -> None:
    with pytest.raises(QLoRAConfigError) as error:
        recipe_spec(quant_type="nf5")
    assert (error.value.field, error.value.value) == ("quant_type", "nf5")
    assert error.value.problem == "is not supported. Did you mean 'nf4'?"
    assert error.value.fix == "use one of ['nf4', 'fp4']"
