"""The quality options of issue 28 on a tiny Llama (CPU): blocksize, LoftQ starts, targets kept in 16 bits.

Each builds real 4-bit LoRA layers through PEFT with the recipe, and ``qlora merge`` rebuilds the
base training saw.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qlora_plugin import qlora_recipe
from qlora_plugin.core.errors import QLoRAConfigError

KEPT = "model.layers.0.mlp.down_proj"


def adapted(model_dir: Path, **fields):
    """The tiny model loaded by the recipe (``recipe.load_model``) with its LoRA layers; (peft model, recipe)."""
    from peft import get_peft_model

    recipe = qlora_recipe(model=model_dir, compute_dtype="float32", **fields)
    return get_peft_model(recipe.load_model(model_dir), recipe), recipe


def lora_layers(model) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def original_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {name: module.weight.detach().clone() for name, module in model.named_modules() if hasattr(module, "weight")}


def dequantized(layer) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit

    weight = layer.get_base_layer().weight
    return dequantize_4bit(weight.data, weight.quant_state).float()


def test_the_fields_are_checked_and_any_of_them_loads_the_base_in_16_bits() -> None:
    assert qlora_recipe(blocksize="32").blocksize == 32
    for bad in (
        {"blocksize": 48},
        {"blocksize": 0},
        {"adapter_init": "pissa"},
        {"adapter_init": "loftq", "use_dora": True},
    ):
        with pytest.raises(QLoRAConfigError):
            qlora_recipe(**bad)
    assert qlora_recipe().quantization_config() is not None
    for fields in ({"blocksize": 32}, {"adapter_init": "loftq"}, {"unquantized_modules": [KEPT]}):
        recipe = qlora_recipe(**fields)
        assert recipe.quantizes_targets_itself and recipe.quantization_config() is None
        assert "quantization_config" not in recipe.sft_config(output_dir="/tmp/unused").model_init_kwargs
    assert qlora_recipe(unquantized_modules=[KEPT]).recipe_fields()["unquantized_modules"] == [KEPT]


def test_blocksize_32_quantizes_every_target_in_blocks_of_32(tiny_model_dir) -> None:
    import bitsandbytes as bnb

    model, recipe = adapted(tiny_model_dir, blocksize=32)
    layers = lora_layers(model)
    assert len(layers) == 14  # 2 layers x 7 projections
    for layer in layers.values():
        base = layer.get_base_layer()
        assert isinstance(base, bnb.nn.Linear4bit) and base.weight.quant_state.blocksize == 32
    coarse, _ = adapted(tiny_model_dir)
    weights = original_weights(tiny_model_dir)

    def error(m) -> float:
        return sum(float(((dequantized(layer) - weights[n]) ** 2).sum()) for n, layer in lora_layers(m).items())

    assert error(model) < 0.95 * error(coarse)  # finer scales: less quantization error


def test_loftq_starts_each_adapter_at_the_best_rank_r_fit_of_its_quantization_error(tiny_model_dir) -> None:
    model, recipe = adapted(tiny_model_dir, adapter_init="loftq", r=4, lora_alpha=16)
    weights = original_weights(tiny_model_dir)
    for name, layer in lora_layers(model).items():
        residual = weights[name] - dequantized(layer)
        adapter = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        left = float(((residual - adapter.detach()) ** 2).sum())
        singular = torch.linalg.svdvals(residual)
        assert left == pytest.approx(float((singular[4:] ** 2).sum()), rel=1e-3), name  # Eckart-Young optimum
        assert left < 0.95 * float((residual**2).sum()), name

    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[2, 5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()(ids).logits
        gaps = {}
        for init in ("loftq", "default"):  # at the recipe's rank 16 (a rank-4 start is too coarse to show it here)
            start, _ = adapted(tiny_model_dir, adapter_init=init)
            gaps[init] = float(((start.eval()(ids).logits - full) ** 2).mean())
    assert gaps["loftq"] < 0.8 * gaps["default"]  # base plus adapter starts nearer the 16-bit model


def test_unquantized_modules_keep_their_16_bit_base_under_a_seeded_plain_lora_layer(tiny_model_dir) -> None:
    import bitsandbytes as bnb
    from peft.tuners.lora.layer import Linear as LoraLinear

    model, recipe = adapted(tiny_model_dir, unquantized_modules=[KEPT])
    weights = original_weights(tiny_model_dir)
    layers = lora_layers(model)
    kept = layers.pop(KEPT)
    assert type(kept) is LoraLinear and type(kept.get_base_layer()) is torch.nn.Linear
    assert torch.equal(kept.get_base_layer().weight, weights[KEPT])
    assert all(isinstance(layer.get_base_layer(), bnb.nn.Linear4bit) for layer in layers.values())
    again, _ = adapted(tiny_model_dir, unquantized_modules=[KEPT])
    assert torch.equal(lora_layers(again)[KEPT].lora_A["default"].weight, kept.lora_A["default"].weight)


def test_a_base_already_in_4_bits_is_refused_where_an_option_needs_the_16_bit_weights(tiny_model_dir) -> None:
    from peft import get_peft_model

    loaded = qlora_recipe(compute_dtype="float32").load_model(tiny_model_dir)
    for fields in ({"adapter_init": "loftq"}, {"blocksize": 32}, {"unquantized_modules": [KEPT]}):
        with pytest.raises(QLoRAConfigError, match="loaded in 4 bits"):
            get_peft_model(loaded, qlora_recipe(model=tiny_model_dir, compute_dtype="float32", **fields))


@pytest.mark.parametrize("fields", [{"blocksize": 32, "unquantized_modules": [KEPT]}, {"adapter_init": "loftq"}])
def test_merge_rebuilds_the_base_training_saw(tiny_model_dir, tmp_path, fields) -> None:
    """The merged model answers as the adapter on its 4-bit base does (issue 28, item 5)."""
    from transformers import AutoModelForCausalLM

    from qlora_plugin.tools.merge import merge_adapter

    model, _ = adapted(tiny_model_dir, **fields)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "adapter")
    merge_adapter(tmp_path / "adapter", tmp_path / "merged", dtype="fp32", show_progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = torch.tensor([[2, 5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        expected, got = model.eval()(ids).logits, merged(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_axolotl_refuses_the_options_it_cannot_honour() -> None:
    from qlora_plugin.build.context import make_context
    from qlora_plugin.integrations.axolotl.expand import native_keys

    plain = qlora_recipe()
    assert native_keys(plain, make_context(plain, device="cpu"))["load_in_4bit"] is True
    for fields in ({"blocksize": 32}, {"adapter_init": "loftq"}, {"unquantized_modules": [KEPT]}):
        recipe = qlora_recipe(**fields)
        with pytest.raises(QLoRAConfigError, match="Axolotl's 4-bit loading"):
            native_keys(recipe, make_context(recipe, device="cpu"))


@pytest.mark.parametrize(
    "fields",
    [{}, {"blocksize": 32}, {"unquantized_modules": [KEPT]}, {"blocksize": 128, "unquantized_modules": ["v_proj"]}],
    ids=["default", "blocksize-32", "one-kept", "blocksize-128-v-kept"],
)
def test_inspect_and_estimate_count_the_layers_the_recipe_really_quantizes(tiny_model_dir, fields) -> None:
    """``qlora inspect``/``estimate`` count in 4 bits, at the recipe's block size, exactly the layers the recipe
    stores in 4 bits, and the layers it keeps in 16 bits among the unquantized parameters."""
    import bitsandbytes as bnb

    from qlora_plugin.tools.inspection import analyze
    from qlora_plugin.tools.model_report import nf4_bytes

    model, recipe = adapted(tiny_model_dir, **fields)
    in_4bit, in_16bit = {}, {}
    for name, module in model.named_modules():
        name = name.removeprefix("base_model.model.").removesuffix(".base_layer")
        if isinstance(module, bnb.nn.Linear4bit):
            in_4bit[name] = module.weight.quant_state.blocksize
        elif type(module) is torch.nn.Linear and "lora_" not in name and name != "lm_head":
            in_16bit[name] = module.in_features * module.out_features
    report = analyze(tiny_model_dir, recipe)
    assert {t.name for t in report.quantized_linears} == set(in_4bit)
    assert set(in_4bit.values()) == {fields.get("blocksize", 64)}
    assert {t.name: t.in_features * t.out_features for t in report.linears_16bit} == in_16bit
    assert report.quantized_bytes() == sum(
        nf4_bytes(t.in_features * t.out_features, True, fields.get("blocksize", 64)) for t in report.quantized_linears
    )
    real_params = sum(p.numel() * (2 if isinstance(p, bnb.nn.Params4bit) else 1) for p in model.base_model.parameters())
    assert report.base_params + report.trainable_params == real_params
