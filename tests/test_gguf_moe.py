"""``qlora export --format gguf`` of mixture-of-experts models: Qwen3-MoE, Qwen2-MoE and Mixtral.

The planned tensors (transformers 5's fused ``gate_up_proj`` split into llama.cpp's ``ffn_gate_exps`` and
``ffn_up_exps``), the hyper-parameters, and the configs refused because llama.cpp's graph would route
otherwise. Then llama.cpp itself (llama-cpp-python, built by ``make test``; those tests skip where it is not
installed) runs tiny models (4 experts, top-2) exported in f16 against transformers in float32, an adapter
trained on a 4-bit Qwen3-MoE against the adapter, and files written wrong on purpose (gate and up swapped, the
top-k weights normalised otherwise) against the same bound, to show that the bound catches them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_inputs import assert_one_line_error
from gguf_models import MOE_EXPORTABLE, moe_family_model
from tiny_moe import moe_config

from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.tools import gguf_arch
from qlora_plugin.tools.gguf_export import export_gguf

FAMILIES = list(MOE_EXPORTABLE)
ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama"}
IDS = list(range(5, 45))  # 40 positions, within the tiny configs' 64
BOUND = 1e-2  # max |logit difference| / max |logit|; about 2e-3 measured in f16, 0.86 or more with gate and up swapped


def planned(family: str, **overrides: object) -> dict[str, tuple[int, ...]]:
    from transformers import AutoModelForCausalLM

    config = moe_config(family, **{**MOE_EXPORTABLE[family], **overrides})
    model = AutoModelForCausalLM.from_config(config)
    return {t.name: t.shape for t in gguf_arch.plan_tensors(model, config, gguf_arch.family_of(config))}


# -- the plan: names and shapes (numpy's order: llama.cpp's ne reversed) ---------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fused_experts_become_llama_cpp_s_expert_tensors(family) -> None:
    shapes = planned(family)
    experts = {name: shape for name, shape in shapes.items() if name.startswith("blk.0.ffn")}
    expected = {
        "blk.0.ffn_gate_inp.weight": (4, 64),  # the router: {n_embd, n_expert}
        "blk.0.ffn_gate_exps.weight": (4, 32, 64),  # {n_embd, n_ff_exp, n_expert}
        "blk.0.ffn_up_exps.weight": (4, 32, 64),
        "blk.0.ffn_down_exps.weight": (4, 64, 32),  # {n_ff_exp, n_embd, n_expert}
        "blk.0.ffn_norm.weight": (64,),
    }
    if family == "qwen2_moe":  # the shared expert (width 64) and its sigmoid gate, a vector {n_embd}
        expected |= {
            "blk.0.ffn_gate_shexp.weight": (64, 64),
            "blk.0.ffn_up_shexp.weight": (64, 64),
            "blk.0.ffn_down_shexp.weight": (64, 64),
            "blk.0.ffn_gate_inp_shexp.weight": (64,),
        }
    assert experts == expected
    assert len([n for n in shapes if n.startswith("blk.1.")]) == len([n for n in shapes if n.startswith("blk.0.")])
    assert not [name for name in shapes if "gate_up" in name or not name.endswith((".weight", ".bias"))]


def test_gate_rows_come_first_in_the_split() -> None:
    """transformers' experts compute ``linear(x, gate_up_proj[e]).chunk(2)``: gate, then up."""
    from transformers import AutoModelForCausalLM

    config = moe_config("qwen3_moe", norm_topk_prob=True)
    model = AutoModelForCausalLM.from_config(config)
    fused = model.model.layers[1].mlp.experts.gate_up_proj.detach()
    tensors = {t.name: t for t in gguf_arch.plan_tensors(model, config, gguf_arch.family_of(config))}
    assert np.array_equal(tensors["blk.1.ffn_gate_exps.weight"].make(), fused[:, :32].numpy())
    assert np.array_equal(tensors["blk.1.ffn_up_exps.weight"].make(), fused[:, 32:].numpy())


@pytest.mark.parametrize("out_type", ["f16", "q8_0", "q4_0"])
def test_routers_stay_float32_in_every_type(out_type) -> None:
    from transformers import AutoModelForCausalLM

    config = moe_config("qwen2_moe")
    model = AutoModelForCausalLM.from_config(config)
    tensors = gguf_arch.plan_tensors(model, config, gguf_arch.family_of(config))
    typed = {t.name: kind.name for t, kind in gguf_arch.tensor_types(tensors, out_type)}
    assert typed["blk.0.ffn_gate_inp.weight"] == typed["blk.0.ffn_gate_inp_shexp.weight"] == "F32"
    assert typed["blk.0.ffn_gate_exps.weight"] == {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[out_type]


def test_mixtral_is_written_as_llama_with_its_queries_and_keys_permuted() -> None:
    from transformers import AutoModelForCausalLM

    config = moe_config("mixtral")
    model = AutoModelForCausalLM.from_config(config)
    family = gguf_arch.family_of(config)
    tensors = {t.name: t for t in gguf_arch.plan_tensors(model, config, family)}
    q = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert family.arch == "llama" and family.permute_qk
    assert not np.array_equal(tensors["blk.0.attn_q.weight"].make(), q.numpy())  # interleaved RoPE pairs
    assert np.array_equal(np.sort(tensors["blk.0.attn_q.weight"].make(), axis=None), np.sort(q.numpy(), axis=None))


# -- refused: one line naming the config field, the value and the fix ------------------------------------------


def refusal(tmp_path: Path, family: str, **overrides: object) -> str:
    config = moe_config(family, **{**MOE_EXPORTABLE[family], **overrides})
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    config.save_pretrained(tmp_path / family)
    with pytest.raises(QLoRAConfigError) as raised:
        export_gguf(tmp_path / family, tmp_path / "m.gguf", show_progress=False)
    assert not (tmp_path / "m.gguf").exists()
    return str(raised.value)


@pytest.mark.parametrize(
    ("family", "overrides", "field", "value", "says"),
    [
        ("qwen3_moe", {"norm_topk_prob": False}, "config.json norm_topk_prob", "False", "always renormalises"),
        ("qwen2_moe", {"norm_topk_prob": True}, "config.json norm_topk_prob", "True", "never renormalises"),
        ("qwen3_moe", {"decoder_sparse_step": 2}, "config.json decoder_sparse_step", "2", "experts in every layer"),
        ("qwen2_moe", {"mlp_only_layers": [1]}, "config.json mlp_only_layers", "[1]", "experts in every layer"),
        ("qwen2_moe", {"head_dim": 32}, "config.json head_dim", "32", "num_attention_heads x head_dim"),
        ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window", "True", "whole context"),
        ("mixtral", {"hidden_act": "gelu"}, "config.json hidden_act", "gelu", "silu"),
        ("mixtral", {"num_experts_per_tok": 5}, "config.json num_experts_per_tok", "5", "1 to 4 experts"),
    ],
)
def test_a_config_llama_cpp_would_run_differently_is_refused(tmp_path, family, overrides, field, value, says) -> None:
    line = refusal(tmp_path, family, **overrides)
    assert_one_line_error(line, field, value=value)
    assert says in line and "cannot be written to GGUF" in line


def test_gpt_oss_stays_refused_by_name(tmp_path) -> None:
    config = moe_config("gpt_oss")
    config.architectures = ["GptOssForCausalLM"]
    config.save_pretrained(tmp_path / "gpt-oss")
    with pytest.raises(QLoRAConfigError) as raised:
        export_gguf(tmp_path / "gpt-oss", tmp_path / "m.gguf", show_progress=False)
    assert_one_line_error(str(raised.value), "architecture", value="GptOssForCausalLM")
    assert "Mixtral, Qwen2-MoE, Qwen3-MoE" in str(raised.value)


# -- llama.cpp runs the files -------------------------------------------------------------------------------


def llama_cpp_logits(path: Path, ids: list[int]) -> torch.Tensor:
    module = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test builds it)")
    llm = module.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("moe-families")
    return {family: moe_family_model(family, folder / family) for family in FAMILIES}


def transformers_logits(directory: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def routed_experts(directory: Path, ids: list[int]) -> set[tuple[int, int]]:
    """The (layer, expert) pairs transformers' routers pick for ``ids``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    picked: set[tuple[int, int]] = set()
    hooks = [
        layer.mlp.gate.register_forward_hook(
            lambda _m, _i, out, n=n: picked.update((n, int(e)) for e in out[2].flatten())
        )
        for n, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return picked


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_computes_what_transformers_computes(models, tmp_path, family) -> None:
    out = tmp_path / f"{family}.gguf"
    summary = export_gguf(models[family], out, "f16", show_progress=False)
    assert summary["architecture"] == ARCH[family]
    expected = transformers_logits(models[family], IDS)
    actual = llama_cpp_logits(out, IDS)
    error = relative_error(actual, expected)
    print(f"{family}: {ARCH[family]}, max |logit difference| {error:.1e} of the largest logit")  # -s: the figures
    assert error < BOUND
    assert routed_experts(models[family], IDS) == {(n, e) for n in range(2) for e in range(4)}  # top-2 of all 4


@pytest.mark.parametrize("family", FAMILIES)
def test_the_file_holds_llama_cpp_s_expert_keys(models, tmp_path, family) -> None:
    from gguf import GGUFReader

    out = tmp_path / f"{family}.gguf"
    export_gguf(models[family], out, "q8_0", show_progress=False)
    fields = GGUFReader(out).fields
    value = {name: field.contents() for name, field in fields.items() if not name.startswith("tokenizer.")}
    arch = ARCH[family]
    assert (value[f"{arch}.expert_count"], value[f"{arch}.expert_used_count"]) == (4, 2)
    assert value.get(f"{arch}.expert_feed_forward_length") == (None if family == "mixtral" else 32)
    assert value[f"{arch}.feed_forward_length"] == (32 if family == "mixtral" else 128)  # llama: each expert's
    assert value.get(f"{arch}.expert_shared_feed_forward_length") == (64 if family == "qwen2_moe" else None)
    module = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test builds it)")
    llm = module.Llama(model_path=str(out), n_ctx=64, verbose=False, n_threads=2)  # loads: every tensor's shape fits
    assert (llm.metadata[f"{arch}.expert_count"], llm.metadata[f"{arch}.expert_used_count"]) == ("4", "2")


def write_edited(directory: Path, out: Path, edit) -> None:
    """``directory`` written as the export writes it, its planned tensors passed through ``edit`` first."""
    from transformers import AutoModelForCausalLM

    from qlora_plugin.build.models import load_config
    from qlora_plugin.tools.gguf_export import _write
    from qlora_plugin.tools.gguf_vocab import read_vocab

    config = load_config(str(directory))
    family = gguf_arch.family_of(config)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    tensors = edit(gguf_arch.plan_tensors(model, config, family))
    _write(out, str(directory), config, family, read_vocab(str(directory), config.vocab_size), tensors, "f16", list)


def swap_gate_and_up(tensors: list) -> list:
    other = {"ffn_gate_exps": "ffn_up_exps", "ffn_up_exps": "ffn_gate_exps"}
    return [dataclasses.replace(t, name=".".join(other.get(p, p) for p in t.name.split("."))) for t in tensors]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_bound_catches_gate_and_up_swapped(models, tmp_path, family) -> None:
    out = tmp_path / "swapped.gguf"
    write_edited(models[family], out, swap_gate_and_up)
    error = relative_error(llama_cpp_logits(out, IDS), transformers_logits(models[family], IDS))
    assert error > 10 * BOUND, error


@pytest.mark.parametrize(("family", "norm_topk_prob"), [("qwen3_moe", False), ("qwen2_moe", True)])
def test_the_refused_routing_would_run_differently_in_llama_cpp(tmp_path, family, norm_topk_prob) -> None:
    """Why ``norm_topk_prob`` is refused: the same weights, written anyway, give other logits in llama.cpp."""
    directory = moe_family_model(family, tmp_path / family, norm_topk_prob=norm_topk_prob)
    out = tmp_path / "refused.gguf"
    write_edited(directory, out, list)
    error = relative_error(llama_cpp_logits(out, IDS), transformers_logits(directory, IDS))
    assert error > 5 * BOUND, error


# -- an adapter trained on a 4-bit Qwen3-MoE, exported -----------------------------------------------------------


def test_an_adapter_on_4bit_experts_exports_as_the_adapter_computes(tmp_path) -> None:
    """LoRA on the attention and on the fused experts of a 4-bit Qwen3-MoE: the export merges it into the
    dequantized base as ``qlora merge`` does, and llama.cpp runs the file as the adapter runs on that base."""
    from peft import PeftModel, get_peft_model

    from qlora_plugin import qlora_recipe
    from qlora_plugin.tools.merge import load_dequantized_base

    base = moe_family_model("qwen3_moe", tmp_path / "base")
    recipe = qlora_recipe(model=base, compute_dtype="float32")
    model = get_peft_model(recipe.load_model(base), recipe)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(tmp_path / "adapter")
    summary = export_gguf(tmp_path / "adapter", tmp_path / "m.gguf", "f16", show_progress=False)
    assert summary["merged_layers"] == 8 + 4 and summary["architecture"] == "qwen3moe"
    assert json.loads((tmp_path / "adapter/adapter_config.json").read_text())["target_parameters"]
    dequantized = load_dequantized_base(str(base), recipe, torch.float32)
    with torch.no_grad():
        without = dequantized.eval()(torch.tensor([IDS])).logits[0]
        expected = PeftModel.from_pretrained(dequantized, tmp_path / "adapter").eval()(torch.tensor([IDS])).logits[0]
    assert relative_error(without, expected) > 10 * BOUND  # the adapter changes more than the bound
    error = relative_error(llama_cpp_logits(tmp_path / "m.gguf", IDS), expected)
    print(f"qwen3_moe adapter: max |logit difference| {error:.1e} of the largest logit")
    assert error < BOUND
