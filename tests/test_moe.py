"""Mixture-of-experts models: fused experts stored in 4 bits, LoRA on them in PEFT's format, the 4-bit forward
against references, saving, reloading, merging, what ``inspect``/``estimate`` report and when training refuses."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator

import pytest
import torch
from tiny_moe import FAMILIES, moe_model, moe_model_dir
from torch import nn

from qlora_plugin import QLoRAConfigError, qlora_recipe
from qlora_plugin.build.moe_experts import (
    QuantizedExperts,
    is_fused_experts,
    make_expert_lora_layer,
    quantize_experts,
    quantize_module,
)
from qlora_plugin.core import patches
from qlora_plugin.core.experts import check_experts, find_experts

TOKENS = 24


def first_experts(model: nn.Module) -> nn.Module:
    return next(module for module in model.modules() if is_fused_experts(module))


def routing(tokens: int = TOKENS, only: tuple[int, ...] = (0, 1, 2, 3), seed: int = 0):
    """Top-2 expert indices among ``only`` and normalised weights for ``tokens`` tokens."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.tensor(only)
    index = torch.stack([pool[torch.randperm(len(only), generator=generator)[:2]] for _ in range(tokens)])
    weights = torch.rand(tokens, 2, generator=generator)
    return index, weights / weights.sum(-1, keepdim=True)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


@pytest.fixture
def versions(monkeypatch) -> Iterator[dict[str, str | None]]:
    """Installed versions to pretend (the registry's cached answers are reset before and after)."""
    real = patches.installed_version
    pretended: dict[str, str | None] = {}
    monkeypatch.setattr(patches, "installed_version", lambda name: pretended.get(name, real(name)))
    monkeypatch.delenv(patches.FORCE_ENV, raising=False)
    patches.allowed.cache_clear()
    yield pretended
    patches.allowed.cache_clear()


# -- storage and forward -----------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_the_4bit_forward_equals_transformers_forward_over_the_dequantized_experts(family) -> None:
    experts = first_experts(moe_model(family))
    reference = copy.deepcopy(experts)
    reference.config._experts_implementation = "eager"  # transformers' own per-expert loop
    quantized = quantize_module(experts, qlora_recipe(compute_dtype="float32"))
    with torch.no_grad():
        for name in quantized.expert_shapes:
            original = getattr(reference, name)
            restored = quantized.dequantized_param(name)
            assert restored.shape == original.shape
            assert (restored - original).abs().mean() < 0.4 * original.abs().mean()  # NF4's error, in its layout
            setattr(reference, name, nn.Parameter(restored))
    x = torch.randn(TOKENS, 64)
    index, weights = routing()
    expected = reference(x, index, weights)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(quantized(x, index, weights), expected, rtol=1e-5, atol=1e-5)


def test_experts_are_nf4_blocksize_64_with_double_quant_and_the_routers_untouched() -> None:
    import bitsandbytes.functional as bnbf

    model = moe_model("qwen3_moe")
    block = model.model.layers[0].mlp
    router, router_weight = block.gate, block.gate.weight.detach().clone()
    original = block.experts.gate_up_proj.detach().clone()
    assert quantize_experts(model, qlora_recipe(compute_dtype="float32")) == 2
    experts = block.experts
    assert quantize_experts(model, qlora_recipe(compute_dtype="float32")) == 0  # once in 4 bits, left alone
    assert block.experts is experts
    assert isinstance(experts, QuantizedExperts)
    state = experts.quant_state("gate_up_proj", 1)
    assert (state.quant_type, state.blocksize, state.nested, state.state2.blocksize) == ("nf4", 64, True, 256)
    assert experts.gate_up_proj_codes.dtype == torch.uint8 and experts.gate_up_proj_codes.shape == (4, 64 * 64 // 2)
    packed, expected_state = bnbf.quantize_4bit(original[1], blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(experts.dequantized("gate_up_proj", 1), bnbf.dequantize_4bit(packed, expected_state))
    stored = sum(buffer.numel() * buffer.element_size() for buffer in experts.buffers())
    weights = sum(p.numel for m in find_experts(model)[:1] for p in m.params)
    assert stored < 0.6 * weights  # about half a byte a weight, constants included (16-bit: 2 bytes)
    assert block.gate is router and torch.equal(router.weight, router_weight) and router.weight.dtype == torch.float32
    assert not [name for name, p in model.named_parameters() if p.dim() == 3 and p.is_floating_point()]


def test_moving_or_casting_the_model_keeps_the_experts_packed_and_exact() -> None:
    quantized = quantize_module(first_experts(moe_model("gpt_oss")), qlora_recipe(compute_dtype="float32"))
    x = torch.randn(TOKENS, 64)
    index, weights = routing()
    expected = quantized(x, index, weights)
    quantized.to(torch.float64).to("cpu").float()  # what trainers and PEFT's fp32 upcasts do to a model
    for name in quantized.expert_shapes:
        placeholder = quantized._parameters[name]
        assert placeholder.dtype == torch.uint8 and placeholder.stride() == (0, 0, 0)  # still one byte
    assert quantized.code.dtype == torch.int32  # the constants' bits, untouched by the casts
    torch.testing.assert_close(quantized(x, index, weights), expected, rtol=0, atol=0)
    for moved in (copy.deepcopy(quantized), copy.deepcopy(quantized).to("meta")):  # a copy, another device
        assert all(moved._parameters[name].stride() == (0, 0, 0) for name in moved.expert_shapes)


@pytest.mark.parametrize("strategy", ["grouped", "per_expert"])
def test_the_forward_dequantizes_only_the_experts_tokens_are_routed_to(strategy, monkeypatch) -> None:
    quantized = quantize_module(first_experts(moe_model("mixtral")), qlora_recipe(compute_dtype="float32"))
    quantized.routing_strategy = strategy
    seen: list[tuple[str, int]] = []
    one, several = QuantizedExperts.quant_state, QuantizedExperts.dequantized_experts
    monkeypatch.setattr(
        QuantizedExperts,
        "quant_state",
        lambda self, name, expert: seen.append((name, expert)) or one(self, name, expert),
    )

    def batch(self, name: str, first: int, stop: int) -> torch.Tensor:
        seen.extend((name, expert) for expert in range(first, stop))
        return several(self, name, first, stop)

    monkeypatch.setattr(QuantizedExperts, "dequantized_experts", batch)
    index, weights = routing(only=(1, 3))
    quantized(torch.randn(TOKENS, 64), index, weights)
    assert {expert for _, expert in seen} == {1, 3}
    assert sorted(set(seen)) == [(name, e) for name in ("down_proj", "gate_up_proj") for e in (1, 3)]


def test_auto_routing_groups_a_training_batch_and_loops_over_experts_for_a_few_tokens(monkeypatch) -> None:
    quantized = quantize_module(first_experts(moe_model("qwen3_moe")), qlora_recipe(compute_dtype="float32"))
    batched: list[int] = []
    several = QuantizedExperts.dequantized_experts
    monkeypatch.setattr(
        QuantizedExperts,
        "dequantized_experts",
        lambda self, name, first, stop: batched.append(stop - first) or several(self, name, first, stop),
    )
    index, weights = routing(tokens=1)  # 2 routed tokens, 4 experts: generation
    quantized(torch.randn(1, 64), index, weights)
    assert batched == []
    index, weights = routing()
    quantized(torch.randn(TOKENS, 64), index, weights)
    assert batched and max(batched) > 1  # several experts in one launch


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_a_run_of_experts_dequantizes_to_the_values_of_one_expert_at_a_time(family, quant_type, double_quant) -> None:
    recipe = qlora_recipe(compute_dtype="bfloat16", quant_type=quant_type, double_quant=double_quant)
    quantized = quantize_module(first_experts(moe_model(family)), recipe)
    for name in quantized.expert_shapes:
        for first, stop in ((0, 4), (1, 3), (2, 3)):
            expected = torch.stack([quantized.dequantized(name, e) for e in range(first, stop)])
            assert torch.equal(quantized.dequantized_experts(name, first, stop), expected), (name, first, stop)


def grouped_and_per_expert(family: str, compute_dtype: str, double_quant: bool = True):
    """Outputs, input gradients and LoRA gradients of the same experts through both forwards."""
    experts, _, outer = wrapped(family, compute_dtype, double_quant=double_quant)
    x = torch.randn(TOKENS, 64, requires_grad=True)
    index, weights = routing(only=(0, 2, 3))  # expert 1 gets no token
    direction = torch.randn(TOKENS, 64)
    results = {}
    for strategy in ("grouped", "per_expert"):
        experts.routing_strategy = strategy
        for param in [*outer.parameters(), x]:
            param.grad = None
        y = outer(x, index, weights)
        (y.float() * direction).sum().backward()
        lora = {name: p.grad.clone() for name, p in outer.named_parameters() if "lora_" in name}
        results[strategy] = {"output": y.detach(), "input": x.grad.clone()} | lora
    return results["grouped"], results["per_expert"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_the_grouped_forward_equals_the_per_expert_forward_in_value_and_gradient(family, double_quant) -> None:
    grouped, per_expert = grouped_and_per_expert(family, "float32", double_quant)
    assert set(grouped) == set(per_expert) and len(grouped) == 6
    for name, value in grouped.items():
        assert value.abs().max() > 0, name
        torch.testing.assert_close(value, per_expert[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_the_grouped_forward_in_bf16_agrees_with_the_per_expert_forward(family) -> None:
    grouped, per_expert = grouped_and_per_expert(family, "bfloat16")
    for name, value in grouped.items():
        assert cosine(value, per_expert[name]) >= 0.9999, (name, cosine(value, per_expert[name]))
    assert grouped["output"].dtype == torch.float32  # the caller's dtype comes back


def wrapped(family: str, compute_dtype: str = "float32", r: int = 4, double_quant: bool = True):
    """A 4-bit experts module inside PEFT's nested ParamWrappers, as PEFT builds them, LoRA weights drawn non-zero."""
    model = moe_model(family)
    recipe = qlora_recipe(model=model, compute_dtype=compute_dtype, r=r, lora_alpha=2 * r, double_quant=double_quant)
    experts = quantize_module(first_experts(model), recipe)
    inner = make_expert_lora_layer(experts, "default", recipe, r=r, lora_alpha=2 * r, parameter_name="gate_up_proj")
    outer = make_expert_lora_layer(inner, "default", recipe, r=r, lora_alpha=2 * r, parameter_name="down_proj")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in outer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return experts, inner, outer


def reference_forward(experts: QuantizedExperts, wrappers, x, index, weights) -> torch.Tensor:
    """Plain torch in float64: each routed expert's dequantized weight plus PEFT's own delta (B_e A_e * scaling)."""
    full = {
        w.parameter_name: experts.dequantized_param(w.parameter_name, torch.float64)
        + w.get_delta_weight("default").double()
        for w in wrappers
    }
    bias = {name: experts._parameters.get(f"{name}_bias") for name in full}
    out = torch.zeros(x.shape, dtype=torch.float64)
    for token in range(x.shape[0]):
        for slot in range(index.shape[1]):
            e = int(index[token, slot])
            h = x[token].double()
            for name in ("gate_up_proj", "down_proj"):
                matrix = full[name][e]
                h = h @ matrix if experts.is_transposed else matrix @ h
                if bias[name] is not None:
                    h = h + bias[name][e].double()
                if name == "gate_up_proj":
                    h = experts._gate(h[None])[0]
            out[token] += weights[token, slot].double() * h
    return out


@pytest.mark.parametrize(
    ("family", "compute_dtype"), [("qwen3_moe", "float32"), ("gpt_oss", "float32"), ("mixtral", "bfloat16")]
)
@pytest.mark.parametrize("strategy", ["grouped", "per_expert"])
def test_lora_gradients_on_experts_match_a_plain_torch_reference(family, compute_dtype, strategy) -> None:
    experts, inner, outer = wrapped(family, compute_dtype)
    experts.routing_strategy = strategy
    x = torch.randn(TOKENS, 64, requires_grad=True)
    index, weights = routing()
    direction = torch.randn(TOKENS, 64, dtype=torch.float64)
    lora = {name: p for name, p in outer.named_parameters() if "lora_" in name}

    def gradients(output: torch.Tensor) -> dict[str, torch.Tensor]:
        for p in [*lora.values(), x]:
            p.grad = None
        (output.double() * direction).sum().backward()
        return {name: p.grad.clone() for name, p in lora.items()} | {"input": x.grad.clone()}

    ours = gradients(outer(x, index, weights))
    expected = gradients(reference_forward(experts, [inner, outer], x, index, weights))
    assert set(ours) == {"input", *lora} and len(lora) == 4
    for name in ours:
        assert ours[name].abs().max() > 0, name
        assert cosine(ours[name], expected[name]) >= 0.999, (name, cosine(ours[name], expected[name]))


@pytest.mark.parametrize("strategy", ["grouped", "per_expert"])
def test_backward_keeps_no_dequantized_expert_weight(strategy) -> None:
    experts, _, outer = wrapped("qwen3_moe")
    experts.routing_strategy = strategy
    matrices = {tuple(experts.matrix_shape(name)) for name in experts.expert_shapes}
    matrices |= {shape[::-1] for shape in matrices}
    matrices |= {(n, *shape) for shape in set(matrices) for n in range(1, 5)}  # a run of experts
    saved: list[tuple[int, ...]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(tensor.shape))
        return tensor

    index, weights = routing()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outer(torch.randn(TOKENS, 64, requires_grad=True), index, weights).sum().backward()
    assert saved and not matrices & set(saved), saved


# -- PEFT format, reload, merge ---------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_on_4bit_experts_have_peft_s_own_names_and_shapes(family) -> None:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    recipe = qlora_recipe(model=moe_model(family), compute_dtype="float32")
    ours = get_peft_model(moe_model(family), recipe)  # 16-bit experts: quantized as PEFT wraps them
    assert all(m.quantized and m.adapted == {p.name for p in m.params} for m in find_experts(ours))
    native = get_peft_model(
        moe_model(family),
        LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=sorted(recipe.target_modules),
            target_parameters=recipe.target_parameters,
        ),
    )
    shapes = {key: tuple(value.shape) for key, value in get_peft_model_state_dict(ours).items()}
    assert any(".experts." in key for key in shapes)
    assert shapes == {key: tuple(value.shape) for key, value in get_peft_model_state_dict(native).items()}
    trainable = [name for name, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory):
    """A tiny Qwen3-MoE on disk, loaded in 4 bits through the recipe, its adapters drawn non-zero and saved."""
    from peft import get_peft_model

    directory = tmp_path_factory.mktemp("moe")
    base = moe_model_dir("qwen3_moe", directory / "base")
    recipe = qlora_recipe(model=base, compute_dtype="float32")
    model = get_peft_model(recipe.load_model(base), recipe)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(directory / "adapter")
    ids = torch.randint(4, 40, (2, 16), generator=generator)
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    return base, directory / "adapter", recipe, ids, logits


def test_the_recipe_loads_the_base_with_its_experts_in_4bits(trained_adapter) -> None:
    base, _, recipe, _, _ = trained_adapter
    model = recipe.load_model(base)
    assert [m.quantized for m in find_experts(model)] == [True, True]
    assert not [name for name, p in model.named_parameters() if p.dim() == 3 and p.is_floating_point()]


def test_the_saved_adapter_reloads_onto_a_fresh_4bit_base_with_the_same_logits(trained_adapter) -> None:
    import json

    from peft import PeftModel

    base, adapter, recipe, ids, logits = trained_adapter
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(recipe.target_parameters) and config["lora_dropout"] == 0
    reloaded = PeftModel.from_pretrained(recipe.load_model(base), adapter)  # PEFT's own loader builds the layers
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, logits)


def test_peft_alone_loads_the_adapter_onto_the_dequantized_base(trained_adapter) -> None:
    from peft import PeftModel

    from qlora_plugin.tools.merge import load_dequantized_base

    base, adapter, recipe, ids, logits = trained_adapter
    model = PeftModel.from_pretrained(load_dequantized_base(str(base), recipe, torch.float32), adapter)
    assert not find_experts(model)[0].quantized  # 16-bit experts, PEFT's ParamWrapper forward
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)


def test_merge_equals_the_adapter_on_the_4bit_base(trained_adapter, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from qlora_plugin.tools.merge import merge_adapter

    _, adapter, _, ids, logits = trained_adapter
    result = merge_adapter(adapter, tmp_path / "merged", dtype="fp32", show_progress=False)
    assert result["merged_layers"] == 8 + 4  # attention projections, and the nested expert wrappers
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(".lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)


def test_merging_into_4bit_experts_is_refused_with_the_fix(trained_adapter) -> None:
    from peft import PeftModel

    base, adapter, recipe, _, _ = trained_adapter
    model = PeftModel.from_pretrained(recipe.load_model(base), adapter)
    experts = model.base_model.model.model.layers[0].mlp.experts
    with pytest.raises(QLoRAConfigError, match="qlora merge"):
        experts.merge()


# -- the recipe's targets -----------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_discovery_targets_the_experts_and_never_a_router(family, caplog) -> None:
    model = moe_model(family)
    with caplog.at_level(logging.WARNING, logger="qlora_plugin"):
        recipe = qlora_recipe(model=model)
    expected = sorted(p.name for m in find_experts(model) for p in m.params)
    assert sorted(recipe.target_parameters) == expected and len(expected) == 4
    assert all(name.rsplit(".", 1)[-1] in ("gate_up_proj", "down_proj") for name in expected)
    assert not [
        name for name in recipe.target_modules if name.rsplit(".", 1)[-1] in ("gate", "router", "shared_expert_gate")
    ]
    assert recipe.lora_dropout == 0.0
    assert sum("without dropout" in r.getMessage() for r in caplog.records) == 1

    linear_only = qlora_recipe(model=model, lora_on_experts=False)
    assert not linear_only.target_parameters and linear_only.lora_dropout == 0.05
    assert sorted(linear_only.target_modules) == sorted(recipe.target_modules)
    assert not qlora_recipe(model=model, exclude_modules=["experts"]).target_parameters


def test_a_dense_model_gets_no_target_parameters(tiny_model_dir) -> None:
    recipe = qlora_recipe(model=tiny_model_dir)
    assert not recipe.target_parameters and recipe.lora_dropout == 0.05


# -- refusals and the fallback ------------------------------------------------------


def test_training_refuses_experts_left_in_16_bits_in_one_line() -> None:
    from peft import LoraConfig, get_peft_model

    model = moe_model("gpt_oss")
    names = qlora_recipe(model=model).target_parameters
    plain = get_peft_model(model, LoraConfig(target_modules=["q_proj"], target_parameters=names))  # not the recipe
    with pytest.raises(QLoRAConfigError) as error:
        check_experts(plain, qlora_recipe())
    message = str(error.value)
    assert "\n" not in message and "2 of its 2 mixture-of-experts expert modules" in message
    assert "16 bits" in message and "recipe.load_model" in message


def test_training_refuses_experts_without_adapters_unless_the_recipe_says_so() -> None:
    from peft import LoraConfig, get_peft_model

    model = moe_model("qwen3_moe")
    recipe = qlora_recipe(compute_dtype="float32")
    quantize_experts(model, recipe)
    attention_only = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
    with pytest.raises(QLoRAConfigError) as error:
        check_experts(attention_only, recipe)
    assert "\n" not in str(error.value) and "carry no LoRA adapter" in str(error.value)
    assert "lora_on_experts=False" in str(error.value)
    check_experts(attention_only, qlora_recipe(lora_on_experts=False))


def test_the_trainer_callbacks_store_the_experts_in_4bits_and_check_them_before_the_first_step() -> None:
    from qlora_plugin.integrations.moe_check import ExpertsCheck

    checks = [c for c in qlora_recipe(compute_dtype="float32").callbacks() if isinstance(c, ExpertsCheck)]
    assert len(checks) == 1
    model = moe_model("mixtral")
    with pytest.raises(QLoRAConfigError, match="carry no LoRA adapter"):
        checks[0].on_train_begin(None, None, None, model=model)
    assert [m.quantized for m in find_experts(model)] == [True, True]


@pytest.mark.parametrize("lora_on_experts", [False, True])
def test_the_first_training_forward_stores_16bit_experts_in_4bits_and_refuses_missing_adapters(
    lora_on_experts, caplog
) -> None:
    from peft import get_peft_model

    recipe = qlora_recipe(compute_dtype="float32", target_modules=["q_proj", "v_proj"], lora_on_experts=lora_on_experts)
    model = get_peft_model(moe_model("qwen3_moe"), recipe)  # never resolved on the model: experts untouched so far
    assert [m.quantized for m in find_experts(model)] == [False, False]
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        model.eval()(input_ids=ids)  # evaluation is left alone
    assert [m.quantized for m in find_experts(model)] == [False, False]
    model.train()
    with caplog.at_level(logging.WARNING, logger="qlora_plugin"):
        if lora_on_experts:
            with pytest.raises(QLoRAConfigError, match="carry no LoRA adapter"):
                model(input_ids=ids, labels=ids)
        else:
            model(input_ids=ids, labels=ids).loss.backward()
    assert [m.quantized for m in find_experts(model)] == [True, True]
    assert sum("stored in 4 bits now" in r.getMessage() for r in caplog.records) == 1


def test_outside_the_tested_transformers_experts_stay_16bit_with_one_warning(versions, caplog) -> None:
    from peft import get_peft_model

    versions["transformers"] = "5.99.0"
    model = moe_model("qwen3_moe")
    recipe = qlora_recipe(model=model, compute_dtype="float32")
    with caplog.at_level(logging.WARNING, logger="qlora_plugin"):
        assert quantize_experts(model, recipe) == 0
        peft_model = get_peft_model(model, recipe)
        check_experts(peft_model, recipe)  # announced, so not refused
    warnings = [r.getMessage() for r in caplog.records if "transformers-fused-experts" in r.getMessage()]
    assert len(warnings) == 1 and "5.99.0" in warnings[0]
    assert [(m.quantized, len(m.adapted)) for m in find_experts(peft_model)] == [(False, 2), (False, 2)]
    ids = torch.randint(0, 128, (2, 8))
    peft_model(input_ids=ids, labels=ids).loss.backward()  # PEFT's own ParamWrapper over 16-bit experts


# -- loading: the experts never all on the GPU in 16 bits -------------------------------------------------------


def _loader_tested() -> bool:
    """Whether the installed transformers and accelerate are the ones the experts-on-the-CPU load was tested with."""
    from qlora_plugin.build.moe_loading import ACCELERATE_PATCH, TRANSFORMERS_PATCH

    return patches.in_tested_range(TRANSFORMERS_PATCH) and patches.in_tested_range(ACCELERATE_PATCH)


# outside those versions the load is the plain one (its own test pretends the versions)
tested_loader = pytest.mark.skipif(
    not _loader_tested(), reason="transformers/accelerate outside the load's tested range"
)


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    """A saved tiny checkpoint of each family (bf16), made when first asked for."""
    made: dict[str, object] = {}

    def directory(family: str):
        if family not in made:
            made[family] = moe_model_dir(family, tmp_path_factory.mktemp(family))
        return made[family]

    return directory


def _load_experts_off(monkeypatch, base, device: torch.device):
    """``recipe.load_model(base)`` through the experts-on-the-CPU load onto ``device``, and what accelerate's
    dispatch saw: the map transformers handed it and how many modules carried its hooks right after it."""
    import transformers.integrations.accelerate as hf_accelerate

    from qlora_plugin.build import models

    dispatched: list[tuple[dict, int]] = []
    original = hf_accelerate.dispatch_model

    def dispatch_model(model, **kwargs):
        result = original(model, **kwargs)
        dispatched.append((dict(kwargs["device_map"]), sum(hasattr(m, "_hf_hook") for m in model.modules())))
        return result

    monkeypatch.setattr(hf_accelerate, "dispatch_model", dispatch_model)  # a spy: accelerate's own code runs
    monkeypatch.setattr(models, "experts_load_device", lambda *_: device)
    return qlora_recipe().load_model(base), dispatched


def _plain_model_problems(model: nn.Module, device: torch.device) -> list[str]:
    """What would tell ``model`` from a model loaded onto ``device`` alone."""
    problems = [
        f"{name}: {attr}"
        for name, module in model.named_modules()
        for attr in ("_hf_hook", "_old_forward")
        if attr in vars(module)
    ]
    problems += [f"{name}: own forward" for name, module in model.named_modules() if "forward" in vars(module)]
    problems += [f"model.{attr}" for attr in ("hf_device_map", "to", "cuda") if attr in vars(model)]
    problems += [
        f"{name} on {t.device}" for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device != device
    ]
    return problems


@pytest.mark.parametrize("family", FAMILIES)
def test_the_load_map_puts_each_experts_module_on_the_cpu_and_every_other_tensor_on_the_gpu(family, tmp_path):
    from tiny_moe import moe_config
    from transformers.integrations.accelerate import expand_device_map

    from qlora_plugin.build.models import meta_model
    from qlora_plugin.build.moe_loading import experts_device_map

    moe_config(family).save_pretrained(tmp_path)
    meta = meta_model(tmp_path)
    gpu = torch.device("cuda", 0)  # a name in a map: no GPU needed
    device_map = experts_device_map(meta, gpu)
    experts = [name for name, module in meta.named_modules() if is_fused_experts(module)]
    assert len(experts) == 2 and all(device_map[name] == "cpu" for name in experts)
    # no entry above an experts module: accelerate moves such an entry's whole subtree to its device
    assert not [key for key in device_map for name in experts if name.startswith(key + ".") or key == ""]
    assert all(key in dict(meta.named_modules()) for key in device_map)  # module names only (accelerate checks)
    tensors = [name for name, _ in [*meta.named_parameters(), *meta.named_buffers()]]
    placed = expand_device_map(device_map, tensors)  # how transformers' loader reads the map
    assert {name for name, where in placed.items() if where == "cpu"} == {
        name for name in tensors if any(name.startswith(e + ".") for e in experts)
    }
    assert {where for where in placed.values()} == {gpu, "cpu"}


@tested_loader
@pytest.mark.parametrize("family", FAMILIES)
def test_a_load_with_the_experts_on_the_cpu_ends_as_a_plain_model_with_the_plain_load_s_logits(
    family, moe_dirs, monkeypatch, caplog
) -> None:
    """On a CPU, ``torch.device("cpu")`` stands for the GPU: the map then holds two devices (it and "cpu"), so
    transformers and accelerate take the same path as on a GPU (the offload flag, dispatch, its hooks)."""
    base = moe_dirs(family)
    plain = qlora_recipe().load_model(base)
    device = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="qlora_plugin"):
        model, dispatched = _load_experts_off(monkeypatch, base, device)
    ((device_map, hooked),) = dispatched
    experts = [name for name, where in device_map.items() if where == "cpu"]
    assert len(experts) == 2 and all(name.endswith(".experts") for name in experts)
    assert hooked > 10  # accelerate hooked the blocks: all gone now
    assert _plain_model_problems(model, device) == []
    assert _plain_model_problems(plain, device) == []  # what a plain load leaves
    assert [type(model.get_submodule(name)) for name in experts] == [QuantizedExperts] * 2
    assert any("(2 as they were loaded, 0 after the load)" in r.getMessage() for r in caplog.records)
    assert model.config.quantization_config.llm_int8_enable_fp32_cpu_offload is False
    assert model.hf_quantizer.quantization_config.llm_int8_enable_fp32_cpu_offload is False
    ids = torch.randint(4, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)


@tested_loader
def test_without_the_load_hook_the_experts_are_stored_after_the_load_with_the_same_logits(
    moe_dirs, monkeypatch, versions, caplog
) -> None:
    from qlora_plugin.build.moe_loading import LOAD_HOOK_PATCH

    base = moe_dirs("mixtral")
    plain = qlora_recipe().load_model(base)
    versions["torch"] = "3.0.0"  # outside the load hook's tested range
    with caplog.at_level(logging.INFO, logger="qlora_plugin"):
        model, dispatched = _load_experts_off(monkeypatch, base, torch.device("cpu"))
    assert len(dispatched) == 1 and _plain_model_problems(model, torch.device("cpu")) == []
    messages = [r.getMessage() for r in caplog.records]
    assert any("(0 as they were loaded, 2 after the load)" in m for m in messages)
    assert sum(LOAD_HOOK_PATCH in m and "torch 3.0.0" in m for m in messages) == 1
    assert LOAD_HOOK_PATCH not in patches.applied()
    ids = torch.randint(4, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)


@tested_loader  # the one package pretended outside, the other really inside
@pytest.mark.parametrize(("package", "version"), [("transformers", "5.18.0"), ("accelerate", "1.17.0")])
def test_outside_the_tested_versions_the_experts_load_in_16_bits_first_after_one_warning(
    package, version, moe_dirs, monkeypatch, versions, caplog
) -> None:
    from qlora_plugin.build.moe_loading import ACCELERATE_PATCH, TRANSFORMERS_PATCH

    versions[package] = version
    with caplog.at_level(logging.WARNING, logger="qlora_plugin"):
        model, dispatched = _load_experts_off(monkeypatch, moe_dirs("qwen3_moe"), torch.device("cpu"))
        qlora_recipe().load_model(moe_dirs("qwen3_moe"))
    assert dispatched == []  # the plain load: no map, no dispatch
    assert [m.quantized for m in find_experts(model)] == [True, True]
    name = TRANSFORMERS_PATCH if package == "transformers" else ACCELERATE_PATCH
    warnings = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert len(warnings) == 1 and f"{package} {version}" in warnings[0]


def test_a_dense_model_loads_as_before(tiny_model_dir, monkeypatch) -> None:
    model, dispatched = _load_experts_off(monkeypatch, tiny_model_dir, torch.device("cpu"))
    assert dispatched == [] and not find_experts(model)


@tested_loader
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_load_never_holds_the_experts_in_16_bits_on_the_gpu(tmp_path) -> None:
    """16 experts of hidden 256 in 4 layers (48 MiB of bf16 experts): the load's GPU peak stays below them."""
    from tiny_moe import SHARED
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        **(SHARED | dict(hidden_size=256, num_hidden_layers=4)),
        vocab_size=128,
        intermediate_size=512,
        moe_intermediate_size=512,
        num_experts=16,
        head_dim=64,
    )
    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in source.named_parameters():
            if ".experts." in name:
                param.normal_(0.0, 0.1)
    source.to(torch.bfloat16).save_pretrained(tmp_path)
    experts_bytes = sum(p.numel() * 2 for name, p in source.named_parameters() if ".experts." in name)
    assert experts_bytes == 4 * 16 * 3 * 256 * 512 * 2
    del source
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = qlora_recipe().load_model(tmp_path)
    peak = torch.cuda.max_memory_allocated() - before
    assert peak < experts_bytes, (peak, experts_bytes)
    experts = [module for module in model.modules() if isinstance(module, QuantizedExperts)]
    assert len(experts) == 4 and all(m.stored("gate_up_proj_codes").is_cuda for m in experts)
    assert _plain_model_problems(model, torch.device("cuda", torch.cuda.current_device())) == []
    with torch.no_grad():
        logits = model(input_ids=torch.randint(4, 120, (2, 32), device="cuda")).logits
    assert torch.isfinite(logits).all()


# -- inspect and estimate -----------------------------------------------------------


def test_inspect_lists_the_experts_in_4bits_and_with_adapters(tmp_path) -> None:
    from cli_helpers import run_json
    from tiny_moe import moe_config

    moe_config("qwen3_moe").save_pretrained(tmp_path)
    experts = run_json("inspect", tmp_path)["experts"]
    assert (experts["modules"], experts["experts_per_module"], experts["parameters"]) == (2, 4, 4)
    assert (experts["quantized_4bit"], experts["with_adapters"]) == (4, 4)
    assert experts["lora_params"] == 2 * 16 * 4 * ((64 + 64) + (32 + 64))
    linear_only = run_json("inspect", tmp_path, "--set", "lora_on_experts=false")["experts"]
    assert (linear_only["quantized_4bit"], linear_only["with_adapters"]) == (4, 0)


def test_estimate_counts_the_experts_in_4bits(tmp_path, versions) -> None:
    from tiny_moe import moe_config

    from qlora_plugin.tools.estimate import estimate
    from qlora_plugin.tools.model_report import experts_nf4_bytes

    moe_config("qwen3_moe").save_pretrained(tmp_path)
    recipe = qlora_recipe()
    four_bit = estimate(tmp_path, recipe, 64, 2)
    expert_bytes = 2 * (experts_nf4_bytes(4, 64 * 64, True) + experts_nf4_bytes(4, 32 * 64, True))
    assert expert_bytes < 49152  # about half a byte a weight
    versions["transformers"] = "5.99.0"  # experts left in 16 bits
    patches.allowed.cache_clear()
    sixteen_bit = estimate(tmp_path, recipe, 64, 2)
    weights = 2 * 4 * (64 * 64 + 32 * 64)
    assert four_bit.components["weights_4bit"] - sixteen_bit.components["weights_4bit"] == expert_bytes
    assert sixteen_bit.components["unquantized_params"] - four_bit.components["unquantized_params"] == 2 * weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_cuda_grouped_forward_and_batched_dequant_agree_with_the_per_expert_path(family) -> None:
    from tiny_moe import moe_config
    from transformers import AutoModelForCausalLM

    config = moe_config(family)
    config.hidden_size, config.num_attention_heads = 256, 4
    for key in ("moe_intermediate_size", "intermediate_size"):
        setattr(config, key, 128)
    for key in ("num_experts", "num_local_experts"):
        if hasattr(config, key):
            setattr(config, key, 16)
    torch.manual_seed(0)
    source = first_experts(AutoModelForCausalLM.from_config(config))
    with torch.no_grad():
        for param in source.parameters():
            param.normal_(0.0, 0.1)
    recipe = qlora_recipe(compute_dtype="bfloat16", r=8, lora_alpha=16, lora_dropout=0.0)
    experts = quantize_module(source.to("cuda"), recipe)
    for name in experts.expert_shapes:
        expected = torch.stack([experts.dequantized(name, e) for e in range(3, 11)])
        assert torch.equal(experts.dequantized_experts(name, 3, 11), expected), name
    outer = make_expert_lora_layer(experts, "default", recipe, r=8, lora_alpha=16, parameter_name="down_proj")
    with torch.no_grad():
        for name, param in outer.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.1)
    tokens = 300
    index = torch.stack([torch.randperm(15)[:4] for _ in range(tokens)]).cuda()  # expert 15 gets no token
    weights = torch.rand(tokens, 4, device="cuda").softmax(-1)
    x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    results = {}
    for strategy in ("grouped", "per_expert"):
        experts.routing_strategy = strategy
        for param in [*outer.parameters(), x]:
            param.grad = None
        y = outer(x, index, weights)
        (y.float() ** 2).sum().backward()
        lora = {name: p.grad.clone() for name, p in outer.named_parameters() if "lora_" in name}
        results[strategy] = {"output": y.detach(), "input": x.grad.clone()} | lora
    for name, value in results["grouped"].items():
        assert value.abs().max() > 0, name
        assert cosine(value, results["per_expert"][name]) >= 0.9999, (name, cosine(value, results["per_expert"][name]))
