"""Under FSDP the recipe's float-stored 4-bit layers make FSDP2 all-gather as bytes (no packed code rewritten).

On GPUs FSDP2's float all-gather turns the packed codes that read as NaN into one canonical NaN
(benchmarks/results/run10-multigpu/probe); a CPU copies them exactly, so these tests check that
the byte path is chosen (where the storage is chosen, and where a float-stored 4-bit layer is
met), and tests/test_multi_gpu.py that it shards and computes exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from qlora_plugin import qlora_recipe
from qlora_plugin.build.context import make_context
from qlora_plugin.build.distributed import FSDP_ENV
from qlora_plugin.build.fsdp_bytes import PATCH, guard_packed_weights
from qlora_plugin.build.quantization import quantize_linear, storage_dtype
from qlora_plugin.core import patches


def _back_to_stock(module: Any) -> None:
    """FSDP2's own all-gather dtype choice again, as if the plugin had never turned the byte path on."""
    patches.revert(PATCH)
    assert not hasattr(module._get_all_gather_input_metadatas, "__wrapped__")


@pytest.fixture
def collectives() -> Iterator[Any]:
    """FSDP2's collectives module with its stock all-gather dtype choice, restored afterwards."""
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as module

    _back_to_stock(module)
    yield module
    _back_to_stock(module)
    patches.allowed.cache_clear()


def _all_gather_dtype(module: Any, *inputs: torch.Tensor) -> torch.dtype:
    return module._get_all_gather_input_metadatas([[t] for t in inputs])[2]


def _quantized_layer(monkeypatch, fsdp: bool) -> tuple[Any, Any]:
    """A layer quantized by the recipe, and its run's context (under FSDP where ``fsdp``)."""
    if fsdp:
        monkeypatch.setenv(FSDP_ENV, "true")
    else:
        monkeypatch.delenv(FSDP_ENV, raising=False)
    recipe = qlora_recipe(compute_dtype="bfloat16")
    context = make_context(recipe)
    return quantize_linear(torch.nn.Linear(128, 64), recipe, torch.bfloat16, context), context


def test_under_fsdp_a_float_stored_layer_turns_the_byte_all_gather_on(collectives, monkeypatch) -> None:
    one = torch.zeros(6, dtype=torch.bfloat16)
    assert _all_gather_dtype(collectives, one, one) == torch.bfloat16  # FSDP2's own choice: one dtype, floats
    layer, context = _quantized_layer(monkeypatch, fsdp=True)
    assert layer.weight.dtype == torch.bfloat16  # the recipe's storage under FSDP
    _back_to_stock(collectives)  # a float-stored layer the recipe did not quantize
    guard_packed_weights(layer, context)
    dtypes, numels, dtype = collectives._get_all_gather_input_metadatas([[one], [one[:4]]])
    assert dtype == torch.uint8
    assert dtypes == [[torch.bfloat16], [torch.bfloat16]] and numels == [[6], [4]]  # per input, as FSDP2 said


def test_choosing_float_storage_under_fsdp_turns_it_on(collectives, monkeypatch) -> None:
    """Where the storage is chosen, before any layer exists: PEFT outside its tested range builds its own
    LoRA layers, and the model's 4-bit weights still come from this choice."""
    recipe = qlora_recipe(compute_dtype="bfloat16")
    monkeypatch.delenv(FSDP_ENV, raising=False)
    assert storage_dtype(recipe, torch.bfloat16, make_context(recipe)) == torch.uint8
    assert _all_gather_dtype(collectives, torch.zeros(2, dtype=torch.bfloat16)) == torch.bfloat16
    monkeypatch.setenv(FSDP_ENV, "true")
    assert storage_dtype(recipe, torch.bfloat16, make_context(recipe)) == torch.bfloat16
    assert _all_gather_dtype(collectives, torch.zeros(2, dtype=torch.bfloat16)) == torch.uint8


def test_without_fsdp_nothing_is_replaced(collectives, monkeypatch) -> None:
    layer, context = _quantized_layer(monkeypatch, fsdp=False)
    assert layer.weight.dtype == torch.uint8
    guard_packed_weights(layer, context)
    assert not hasattr(collectives._get_all_gather_input_metadatas, "__wrapped__")


def test_the_recipes_lora_layers_turn_it_on(collectives, monkeypatch) -> None:
    """Through PEFT: the recipe quantizes a 16-bit model's targets under FSDP and builds its LoRA layers."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv(FSDP_ENV, "true")
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2
    )
    model = get_peft_model(LlamaForCausalLM(config).to(torch.bfloat16), qlora_recipe(compute_dtype="bfloat16"))
    assert model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.bfloat16
    assert _all_gather_dtype(collectives, torch.zeros(2, dtype=torch.bfloat16)) == torch.uint8


def test_outside_the_tested_torch_versions_it_stays_off_with_a_warning(collectives, monkeypatch, caplog) -> None:
    real = patches.installed_version
    monkeypatch.setattr(patches, "installed_version", lambda p: "2.99.0" if p == "torch" else real(p))
    monkeypatch.delenv(patches.FORCE_ENV, raising=False)
    patches.allowed.cache_clear()
    with caplog.at_level(logging.WARNING, logger="qlora_plugin"):  # choosing the storage warns already
        layer, context = _quantized_layer(monkeypatch, fsdp=True)
        guard_packed_weights(layer, context)
        guard_packed_weights(layer, context)
    assert _all_gather_dtype(collectives, torch.zeros(2, dtype=torch.bfloat16)) == torch.bfloat16
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(PATCH in m and "torch 2.99.0" in m for m in messages), messages
    assert sum("issue 1945" in m for m in messages) == 1, messages


def test_a_model_whose_lora_layers_another_library_builds_turns_it_on(collectives, monkeypatch) -> None:
    """Axolotl builds its own LoRA config; its plugin hands the 4-bit model over before the adapters exist."""
    from qlora_plugin.build.fsdp_bytes import guard_packed_model

    layer, context = _quantized_layer(monkeypatch, fsdp=True)
    _back_to_stock(collectives)  # loaded by Axolotl with its own quantization config
    model = torch.nn.Sequential(torch.nn.LayerNorm(128), layer)
    guard_packed_model(torch.nn.Sequential(torch.nn.LayerNorm(128)), context)  # no 4-bit layer: nothing to do
    assert _all_gather_dtype(collectives, torch.zeros(2, dtype=torch.bfloat16)) == torch.bfloat16
    guard_packed_model(model, context)
    assert _all_gather_dtype(collectives, torch.zeros(2, dtype=torch.bfloat16)) == torch.uint8
