"""CPU tests of qlora_plugin.fastpath.kernels' reference paths against bitsandbytes, PEFT and PyTorch.

Real bitsandbytes NF4 layers and real PEFT LoRA layers throughout (no mocks). No speed
thresholds here: speed is measured by benchmarks/bench_qlora.py on a GPU.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _tiny_qlora import SRC, VOCAB, load_4bit, lora, lora_grads, rel_err, tiny_llama_checkpoint

bnbf = pytest.importorskip("bitsandbytes.functional")
pytest.importorskip("peft")

from qlora_plugin.fastpath.kernels import FastPathConfig, PagedAdamW, apply_fast_path  # noqa: E402
from qlora_plugin.fastpath.kernels.dequant import dequantize_4bit, dequantize_4bit_reference  # noqa: E402
from qlora_plugin.fastpath.kernels.layers import rms_norm, rotary, silu_mul  # noqa: E402
from qlora_plugin.fastpath.kernels.lora_linear import lora_4bit_linear  # noqa: E402
from qlora_plugin.fastpath.kernels.losses import linear_cross_entropy, linear_cross_entropy_reference, shift_labels_of  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    return tiny_llama_checkpoint(tmp_path_factory.mktemp("tiny") / "llama")


def test_import_loads_no_gpu_code() -> None:
    code = (
        f"import sys; sys.path.insert(0, {str(SRC)!r}); import qlora_plugin.fastpath.kernels; "
        "print(any(m.split('.')[0] in ('triton', 'liger_kernel') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("shape", [(64, 64), (96, 200), (33, 70), (17, 31), (1, 1000)])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequant_reference_matches_bitsandbytes(shape, nested, quant_type) -> None:
    w = torch.randn(shape, dtype=torch.bfloat16) * 3
    q, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    ref = bnbf.dequantize_4bit(q, state)
    ours = dequantize_4bit_reference(q, state, torch.bfloat16)
    assert ours.shape == ref.shape
    assert torch.equal(ours, ref) or rel_err(ours, ref) < 1e-3
    assert torch.equal(dequantize_4bit(q, state, torch.bfloat16), ref)


@pytest.mark.parametrize("tokens,in_f,out_f", [(7, 128, 96), (33, 200, 64), (1, 64, 130)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("given_copies", [False, True])
def test_fused_lora_function_matches_float64(tokens, in_f, out_f, dropout, given_copies) -> None:
    torch.manual_seed(tokens)
    w = torch.randn(out_f, in_f, dtype=torch.bfloat16) / in_f**0.5
    q, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    x = torch.randn(2, tokens, in_f, dtype=torch.bfloat16, requires_grad=True)
    a = (torch.randn(16, in_f) / in_f**0.5).requires_grad_()
    b = (torch.randn(out_f, 16) * 0.1).requires_grad_()
    copies = dict(a_copy=a.detach().bfloat16(), b_copy=b.detach().bfloat16()) if given_copies else {}
    torch.manual_seed(100 + tokens)
    y = lora_4bit_linear(x, a, b, 2.0, q, state, dropout=dropout, **copies)
    g = torch.randn_like(y)
    y.backward(g)

    # the mask the function drew: same generator state, same draw
    torch.manual_seed(100 + tokens)
    _, mask = torch.native_dropout(x.detach().reshape(-1, in_f), dropout, True)
    keep = mask.view(x.shape).double() / (1 - dropout)
    assert dropout == 0.0 or 0 < int(mask.sum()) < mask.numel()
    w64 = bnbf.dequantize_4bit(q, state).double()
    x64 = x.detach().double().requires_grad_()
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = x64 @ w64.t() + 2.0 * ((x64 * keep) @ a64.t()) @ b64.t()
    y64.backward(g.double())
    assert y.dtype == torch.bfloat16 and a.grad.dtype == torch.float32
    assert rel_err(y, y64) < 1e-2
    assert rel_err(x.grad, x64.grad) < 1e-2
    assert rel_err(a.grad, a64.grad) < 1e-2
    assert rel_err(b.grad, b64.grad) < 1e-2


def test_fused_layers_match_peft_layers(checkpoint) -> None:
    from qlora_plugin.fastpath.kernels.lora_linear import is_lora_4bit_layer, patch_lora_4bit_layers

    pm = lora(load_4bit(checkpoint), stock=False)
    layers = [m for m in pm.modules() if is_lora_4bit_layer(m)]
    assert len(layers) == 14
    torch.manual_seed(3)
    xs = {id(m): torch.randn(2, 5, m.in_features, dtype=torch.bfloat16) for m in layers}
    ref = {}
    for m in layers:
        x = xs[id(m)].clone().requires_grad_()
        y = m(x)
        y.float().square().sum().backward()
        ref[id(m)] = (
            y.detach(),
            x.grad,
            m.lora_A["default"].weight.grad.clone(),
            m.lora_B["default"].weight.grad.clone(),
        )
        m.zero_grad()
    assert patch_lora_4bit_layers(pm) == 14
    for m in layers:
        x = xs[id(m)].clone().requires_grad_()
        y = m(x)
        y.float().square().sum().backward()
        y0, gx0, ga0, gb0 = ref[id(m)]
        assert rel_err(y, y0) < 1e-2
        assert rel_err(x.grad, gx0) < 2e-2
        assert rel_err(m.lora_A["default"].weight.grad, ga0) < 2e-2
        assert rel_err(m.lora_B["default"].weight.grad, gb0) < 2e-2


def test_adapter_copies_are_made_per_forward_and_follow_the_masters(checkpoint) -> None:
    from qlora_plugin.fastpath.kernels.lora_linear import patch_lora_4bit_layers, unpatch_lora_4bit_layers

    pm = lora(load_4bit(checkpoint), stock=False)
    lm = pm.get_base_model()
    layer = lm.model.layers[0].self_attn.q_proj
    a = layer.lora_A["default"].weight
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(2, 5, layer.in_features, dtype=torch.bfloat16)
    reference = layer(x).detach()
    assert patch_lora_4bit_layers(lm, compute_dtype=torch.bfloat16) == 14
    copies = layer.__dict__["_qlora_adapter_copies"]
    assert len(copies.masters) == 28 and copies.get(a) is None  # nothing copied before a forward
    cast_by_the_layer = layer(x).detach()
    assert rel_err(cast_by_the_layer, reference) < 1e-2

    pm(input_ids=torch.randint(0, VOCAB, (1, 6)))
    assert torch.equal(copies.get(a), a.detach().bfloat16())
    assert torch.equal(layer(x), cast_by_the_layer)

    with torch.no_grad():  # changed in place after the copy: the layer casts again
        a.mul_(2)
    assert copies.get(a) is None
    with torch.no_grad():
        changed = layer(x)
    unpatch_lora_4bit_layers(lm)
    assert "_qlora_adapter_copies" not in layer.__dict__
    assert rel_err(changed, layer(x).detach()) < 1e-2 and not torch.allclose(changed, reference)


def test_fused_layer_defers_to_peft_when_adapters_disabled(checkpoint) -> None:
    from qlora_plugin.fastpath.kernels.lora_linear import patch_lora_4bit_layers

    pm = lora(load_4bit(checkpoint), stock=False)
    patch_lora_4bit_layers(pm)
    layer = pm.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    with pm.disable_adapter():
        y = layer(x)
    assert torch.equal(y, layer.base_layer(x))


def test_linear_cross_entropy_reference_matches_full_logits() -> None:
    torch.manual_seed(0)
    h = torch.randn(2, 37, 48, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(301, 48, dtype=torch.bfloat16) / 7
    labels = torch.randint(0, 301, (2, 37))
    labels[0, :5] = -100
    targets = shift_labels_of(labels)
    for num_items in (None, 50):
        loss = linear_cross_entropy_reference(h.reshape(-1, 48), w, targets.reshape(-1), num_items, chunk_size=16)
        gh = torch.autograd.grad(loss, h)[0]
        logits = (h @ w.t()).float()
        ref = torch.nn.functional.cross_entropy(
            logits.reshape(-1, 301),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="mean" if num_items is None else "sum",
        )
        ref = ref if num_items is None else ref / num_items
        gref = torch.autograd.grad(ref, h)[0]
        assert rel_err(loss, ref) < 1e-5
        assert rel_err(gh, gref) < 1e-2
        assert rel_err(linear_cross_entropy(h, w, targets, num_items), ref) < 1e-5


def test_norm_and_swiglu_references_match_transformers() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 9, 64, dtype=torch.bfloat16)
    assert torch.equal(rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))
    a, b = torch.randn(5, 33), torch.randn(5, 33)
    assert torch.equal(silu_mul(a, b), torch.nn.functional.silu(a) * b)


def test_rotary_reference_matches_transformers() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_rope

    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16)
    cos, sin = torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    for got, want in zip(rotary(q, k, cos, sin), hf_rope(q, k, cos, sin), strict=False):
        assert torch.allclose(got, want, atol=1e-6)


def _batches(n: int, seed: int = 7) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB // 4, (2, 48), generator=g) for _ in range(n)]


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_fast_path_matches_stock_qlora(checkpoint, recompute) -> None:
    import bitsandbytes as bnb

    stock = lora(load_4bit(checkpoint), stock=True)
    fast = lora(load_4bit(checkpoint), stock=False)
    report = apply_fast_path(fast, config=FastPathConfig(recompute=recompute))
    assert (
        report.lora_layers_fused == 14 and report.loss_fused and report.norms_patched == 5 and report.mlps_patched == 2
    )
    assert report.layers_recomputed == (2 if recompute == "full" else 0)
    assert all(p.dtype == torch.float32 for p in fast.parameters() if p.requires_grad)
    assert fast.get_base_model().lm_head.weight.dtype == torch.bfloat16
    stock.train()
    fast.train()
    batches = _batches(6)

    # Same gradients from the same weights and data.
    for m in (stock, fast):
        out = m(input_ids=batches[0], labels=batches[0])
        out.loss.backward()
    gs, gf = lora_grads(stock), lora_grads(fast)
    assert gs.keys() == gf.keys()
    for k in gs:
        assert rel_err(gf[k], gs[k]) < 3e-2, k
    assert fast(input_ids=batches[0], labels=batches[0]).logits is None

    # Same losses over a few optimizer steps (bitsandbytes' paged AdamW vs ours).
    opt_s = bnb.optim.PagedAdamW32bit([p for p in stock.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    opt_f = PagedAdamW([p for p in fast.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    for opt in (opt_s, opt_f):
        opt.zero_grad(set_to_none=True)
    losses = {"stock": [], "fast": []}
    for batch in batches:
        for name, m, opt in (("stock", stock, opt_s), ("fast", fast, opt_f)):
            loss = m(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(float(loss))
    for ls, lf in zip(losses["stock"], losses["fast"], strict=False):
        assert abs(lf - ls) / ls < 0.01, losses


def test_paged_adamw_reference_matches_torch_and_bitsandbytes() -> None:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    shapes = [(16, 33), (70, 16), (5,)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(5)]
    params = {k: [t.clone().requires_grad_() for t in init] for k in ("ours", "torch", "bnb")}
    opts = {
        "ours": PagedAdamW(params["ours"], lr=1e-2, weight_decay=0.1),
        "torch": torch.optim.AdamW(params["torch"], lr=1e-2, weight_decay=0.1),
        "bnb": bnb.optim.AdamW32bit(params["bnb"], lr=1e-2, weight_decay=0.1),
    }
    for step_grads in grads:
        for k, opt in opts.items():
            for p, g in zip(params[k], step_grads, strict=False):
                p.grad = g.clone()
            opt.step()
    for a, b, c in zip(params["ours"], params["torch"], params["bnb"], strict=False):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)
        assert torch.allclose(a, c, atol=1e-5, rtol=1e-5)
    state = opts["ours"].state_dict()
    again = PagedAdamW([t.clone().requires_grad_() for t in init], lr=1e-2, weight_decay=0.1)
    again.load_state_dict(state)
    assert torch.equal(again.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])


@pytest.mark.parametrize("lengths", [[5, 9, 5, 3], [16], [1, 7, 2, 2], [6, 6, 6]])
def test_packed_rows_attend_per_sequence_like_separate_sequences(lengths) -> None:
    """A packed row through the packed-batch attention equals each sequence run on its own."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_plugin.fastpath.kernels.attention import IMPLEMENTATION, use_packed_attention

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).train()
    ids = torch.randint(0, 100, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        separate = torch.cat([model(input_ids=part).logits for part in ids.split(lengths, dim=1)], dim=1)
        assert use_packed_attention(model) == 2 and model.config._attn_implementation == IMPLEMENTATION
        packed = model(input_ids=ids, position_ids=positions).logits
        unpacked = model(input_ids=ids[:, : lengths[0]]).logits  # an ordinary batch: transformers' sdpa path
    assert (packed - separate).abs().max() < 1e-5
    assert (unpacked - separate[:, : lengths[0]]).abs().max() < 1e-5


def test_padded_batches_keep_transformers_sdpa_masking() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_plugin.fastpath.kernels.attention import use_packed_attention

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        use_packed_attention(model)
        got = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got[mask.bool()], expected[mask.bool()])
