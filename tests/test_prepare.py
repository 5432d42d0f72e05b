"""The one switch: the fast path keeps the base in the compute dtype, stock upcasts to fp32."""

from __future__ import annotations

import torch

from qlora_plugin import qlora_recipe


def float_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.is_floating_point() and type(p).__name__ != "Params4bit"}


def test_fast_path_keeps_everything_in_the_compute_dtype(tiny_model_dir) -> None:
    model = qlora_recipe().load_model(tiny_model_dir)
    assert float_dtypes(model) == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())
    assert model.is_gradient_checkpointing


def test_stock_path_is_peft_prepare_model_for_kbit_training(tiny_model_dir) -> None:
    model = qlora_recipe(fast_path=False).load_model(tiny_model_dir)
    assert float_dtypes(model) == {torch.float32}
    assert model.is_gradient_checkpointing


def test_fast_path_undoes_an_fp32_upcast(tiny_model_dir) -> None:
    from peft import prepare_model_for_kbit_training

    from qlora_plugin.build.prepare import prepare_for_training

    recipe = qlora_recipe()
    model = prepare_model_for_kbit_training(recipe.replace(fast_path=False).load_model(tiny_model_dir))
    assert torch.float32 in float_dtypes(model)
    prepare_for_training(model, recipe)
    assert float_dtypes(model) == {torch.bfloat16}
