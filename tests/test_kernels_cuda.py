"""CUDA tests of qlora_plugin.fastpath.kernels' GPU paths (Triton dequant, Liger ops, paged AdamW,
offloaded recompute) against the pure-PyTorch references and bitsandbytes.

Skipped where no CUDA device is visible (CI); run on the GPU machine by
benchmarks/run_device.sh. Fresh random inputs every time, odd shapes included.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbf  # noqa: E402
from _tiny_qlora import VOCAB, load_4bit, lora, lora_grads, rel_err, tiny_llama_checkpoint  # noqa: E402

from qlora_plugin.fastpath.kernels import FastPathConfig, PagedAdamW, apply_fast_path  # noqa: E402
from qlora_plugin.fastpath.kernels.dequant import dequantize_4bit_reference  # noqa: E402
from qlora_plugin.fastpath.kernels.layers import rms_norm, rms_norm_reference, rotary, rotary_reference, silu_mul  # noqa: E402
from qlora_plugin.fastpath.kernels.lora_linear import lora_4bit_linear  # noqa: E402
from qlora_plugin.fastpath.kernels.losses import linear_cross_entropy, linear_cross_entropy_reference  # noqa: E402
from qlora_plugin.fastpath.kernels.triton_nf4 import dequantize_4bit_triton  # noqa: E402

DEV = "cuda"


@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (1024, 14336), (33, 70), (17, 31), (1, 1000), (3, 64)])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_dequant_matches_bitsandbytes(shape, nested, quant_type, dtype) -> None:
    w = torch.randn(shape, device=DEV, dtype=dtype) * 2
    q, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    ref = bnbf.dequantize_4bit(q, state).to(dtype)
    out = torch.full(shape, float("nan"), device=DEV, dtype=dtype)
    dequantize_4bit_triton(q, state, dtype, out=out)
    assert not out.isnan().any()
    # fp32 FMA contraction may move the last bit of the fp32 block constant.
    assert rel_err(out, ref) < 1e-3
    assert (out.float() - ref.float()).abs().max() <= ref.float().abs().max() * 2e-2
    assert rel_err(dequantize_4bit_reference(q, state, dtype), ref) < 1e-3


@pytest.mark.parametrize("tokens,in_f,out_f", [(8192, 4096, 1024), (333, 200, 130), (1, 64, 64), (4096, 2048, 8192)])
@pytest.mark.parametrize("triton_dequant", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("cache", [False, True])
def test_fused_lora_function_cuda_matches_float64(tokens, in_f, out_f, triton_dequant, dropout, cache) -> None:
    from qlora_plugin.fastpath.kernels import dequant

    dequantize = dequant.make_dequantizer(triton=triton_dequant, cache_block_constants=cache)
    # torch's dropout with one half of the cases (cache off), the kernels' with the other
    w = torch.randn(out_f, in_f, device=DEV, dtype=torch.bfloat16) / in_f**0.5
    q, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    x = torch.randn(1, tokens, in_f, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    a = (torch.randn(16, in_f, device=DEV) / in_f**0.5).requires_grad_()
    b = (torch.randn(out_f, 16, device=DEV) * 0.05).requires_grad_()
    y = lora_4bit_linear(x, a, b, 2.0, q, state, dropout=dropout, dequant=dequantize, triton_dropout=cache)
    mask = _drawn_keep_mask(y, in_f)
    g = torch.randn_like(y)
    y.backward(g)
    assert dropout == 0.0 or 0 < int(mask.sum()) < mask.numel()
    keep = mask.view(x.shape).double() / (1 - dropout)
    w64 = bnbf.dequantize_4bit(q, state).double()
    x64 = x.detach().double().requires_grad_()
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = x64 @ w64.t() + 2.0 * ((x64 * keep) @ a64.t()) @ b64.t()
    y64.backward(g.double())
    for got, want in ((y, y64.detach()), (x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        assert rel_err(got, want) < 1e-2
    if not triton_dequant:  # the direct calls run bitsandbytes' own kernels: same bits
        assert torch.equal(dequantize(q, state, torch.bfloat16), bnbf.dequantize_4bit(q, state))


def _drawn_keep_mask(y: torch.Tensor, in_f: int) -> torch.Tensor:
    """The keep-mask the fused function saved for ``y``'s backward (bool [T, in_f]; all True without dropout)."""
    from qlora_plugin.fastpath.kernels.lora_dropout import unpack_keep_mask

    node = y.grad_fn
    while "LoRA4bitFunction" not in type(node).__name__:
        node = node.next_functions[0][0]
    mask = node.saved_tensors[4]
    if mask is None:
        return torch.ones(y.numel() // y.shape[-1], in_f, dtype=torch.bool, device=y.device)
    return unpack_keep_mask(mask, in_f) if mask.dtype == torch.int32 else mask


@pytest.mark.parametrize("t,k,r", [(8192, 2048, 16), (8192, 8192, 16), (4096, 4096, 64), (333, 200, 20), (1, 64, 16)])
@pytest.mark.parametrize("p", [0.05, 0.3])
def test_triton_dropout_kernels_match_reference(t, k, r, p) -> None:
    from qlora_plugin.fastpath.kernels import triton_lora_dropout as kernels
    from qlora_plugin.fastpath.kernels.lora_dropout import (
        dropout_add_grad_x_reference,
        dropout_down_reference,
        dropout_grad_a_reference,
        unpack_keep_mask,
    )

    x = torch.randn(t, k, device=DEV, dtype=torch.bfloat16)
    a = (torch.randn(r, k, device=DEV) / k**0.5).bfloat16()
    gu = torch.randn(t, r, device=DEV, dtype=torch.bfloat16)
    grad_x = torch.randn(t, k, device=DEV, dtype=torch.bfloat16)
    u, bits = kernels.dropout_down(x, a, p)
    keep = unpack_keep_mask(bits, k)
    u_ref, bits_ref = dropout_down_reference(x, a, p, keep)
    assert torch.equal(bits, bits_ref)  # nothing set beyond column k
    assert abs((1 - keep.float().mean().item()) - p) < 5 * (p * (1 - p) / (t * k)) ** 0.5 + 1e-3
    if t * k >= 4096:
        assert all(bool((keep[:, i::4] != keep[:, j::4]).any()) for i in range(4) for j in range(i + 1, 4))
    assert rel_err(u, u_ref) < 1e-2
    assert rel_err(kernels.dropout_grad_a(gu, x, bits, p), dropout_grad_a_reference(gu, x, bits, p)) < 1e-3
    got = kernels.dropout_add_grad_x(grad_x.clone(), gu, a, bits, p)
    assert rel_err(got, dropout_add_grad_x_reference(grad_x.clone(), gu, a, bits, p)) < 1e-2
    assert not torch.equal(kernels.dropout_down(x, a, p)[1], bits)  # a new seed at each call


def test_triton_dropout_draws_a_new_mask_at_each_graph_replay() -> None:
    from qlora_plugin.fastpath.kernels import triton_lora_dropout as kernels

    x = torch.randn(512, 256, device=DEV, dtype=torch.bfloat16)
    a = torch.randn(16, 256, device=DEV, dtype=torch.bfloat16)
    kernels.dropout_down(x, a, 0.1)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, bits = kernels.dropout_down(x, a, 0.1)
    masks = []
    for _ in range(3):
        graph.replay()
        masks.append(bits.clone())
    torch.cuda.synchronize()
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


@pytest.mark.parametrize("n,h,v", [(8192, 2048, 128256), (1000, 96, 5003)])
@pytest.mark.parametrize("num_items", [None, 777])
def test_liger_linear_cross_entropy_matches_reference(n, h, v, num_items) -> None:
    hid = (torch.randn(n, h, device=DEV, dtype=torch.bfloat16)).requires_grad_()
    w = torch.randn(v, h, device=DEV, dtype=torch.bfloat16) / h**0.5
    y = torch.randint(0, v, (n,), device=DEV)
    y[::7] = -100
    loss = linear_cross_entropy(hid, w, y, num_items)
    (gh,) = torch.autograd.grad(loss, hid)
    ref = linear_cross_entropy_reference(hid, w, y, num_items, chunk_size=2048)
    (gr,) = torch.autograd.grad(ref, hid)
    assert rel_err(loss, ref) < 1e-3
    assert rel_err(gh, gr) < 2e-2


@pytest.mark.parametrize("shape", [(4, 2048, 4096), (3, 17, 96)])
def test_liger_norm_and_swiglu_match_reference(shape) -> None:
    x = torch.randn(shape, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.rand(shape[-1], device=DEV, dtype=torch.bfloat16) + 0.5).requires_grad_()
    y = rms_norm(x, w, 1e-5)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), g.clone())  # Liger writes dX into dY's buffer
    yr = rms_norm_reference(x, w, 1e-5)
    gxr, gwr = torch.autograd.grad(yr, (x, w), g)
    assert rel_err(y, yr) < 1e-2 and rel_err(gx, gxr) < 1e-2 and rel_err(gw, gwr) < 2e-2
    a = torch.randn(shape, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(shape, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    # Liger's SiLU-mul runs in place on its inputs' buffers: compare on copies.
    zr = torch.nn.functional.silu(a.detach().float()) * b.detach().float()
    ar, br = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    gar, gbr = torch.autograd.grad(torch.nn.functional.silu(ar) * br, (ar, br), g.float())
    z = silu_mul(a.clone(), b.clone())
    ga, gb = torch.autograd.grad(z, (a, b), g)
    assert rel_err(z, zr) < 1e-2 and rel_err(ga, gar) < 1e-2 and rel_err(gb, gbr) < 1e-2


@pytest.mark.parametrize("b,hq,hk,s,d", [(4, 32, 8, 2048, 64), (3, 5, 1, 17, 32)])
def test_liger_rope_matches_reference(b, hq, hk, s, d) -> None:
    q = torch.randn(b, s, hq, d, device=DEV, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.randn(b, s, hk, d, device=DEV, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    pos = torch.arange(s, device=DEV, dtype=torch.float32)
    freqs = pos[:, None] / (10000 ** (torch.arange(0, d, 2, device=DEV) / d))[None]
    emb = torch.cat((freqs, freqs), -1)[None].expand(b, s, d)
    cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
    qr, kr = rotary_reference(q, k, cos, sin)
    gq, gk = torch.randn_like(qr), torch.randn_like(kr)
    want = torch.autograd.grad((qr, kr), (q, k), (gq, gk))
    qo, ko = rotary(q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_(), cos, sin)
    assert rel_err(qo, qr) < 1e-2 and rel_err(ko, kr) < 1e-2
    q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    got = torch.autograd.grad(rotary(q2, k2, cos, sin), (q2, k2), (gq, gk))
    assert rel_err(got[0], want[0]) < 1e-2 and rel_err(got[1], want[1]) < 1e-2


def test_paged_adamw_matches_bitsandbytes_paged_adamw() -> None:
    torch.manual_seed(0)
    shapes = [(16, 4096), (14336, 16), (16, 333), (7,)]
    init = [torch.randn(s, device=DEV) for s in shapes]
    ours_p = [t.clone().requires_grad_() for t in init]
    bnb_p = [t.clone().requires_grad_() for t in init]
    ours = PagedAdamW(ours_p, lr=1e-3, weight_decay=0.01)
    ref = bnb.optim.PagedAdamW32bit(bnb_p, lr=1e-3, weight_decay=0.01)
    for _ in range(6):
        grads = [torch.randn(s, device=DEV) for s in shapes]
        for ps, opt in ((ours_p, ours), (bnb_p, ref)):
            for p, g in zip(ps, grads, strict=False):
                p.grad = g.clone()
            opt.step()
    assert ours.paged_bytes() == 2 * 4 * sum(t.numel() for t in init)
    for a, b in zip(ours_p, bnb_p, strict=False):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    return tiny_llama_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", hidden=256, inter=704, layers=3)


@pytest.mark.parametrize(
    "recompute,triton_dequant,cache",
    [
        ("none", False, True),
        ("none", True, False),
        ("full", False, False),
        ("offload", False, False),
        ("offload", True, True),
    ],
)
def test_fast_path_cuda_matches_stock(checkpoint, recompute, triton_dequant, cache) -> None:
    stock = lora(load_4bit(checkpoint, DEV), stock=True)
    fast = lora(load_4bit(checkpoint, DEV), stock=False)
    cfg = FastPathConfig(recompute=recompute, triton_dequant=triton_dequant, cache_block_constants=cache)
    rep = apply_fast_path(fast, config=cfg)
    assert rep.lora_layers_fused == 21 and rep.loss_fused
    g = torch.Generator().manual_seed(11)
    batches = [torch.randint(0, VOCAB, (2, 64), generator=g).to(DEV) for _ in range(5)]
    for m in (stock, fast):
        m.train()
        m(input_ids=batches[0], labels=batches[0]).loss.backward()
    gs, gf = lora_grads(stock), lora_grads(fast)
    for k in gs:
        assert rel_err(gf[k], gs[k]) < 3e-2, k
    opt_s = bnb.optim.PagedAdamW32bit([p for p in stock.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    opt_f = PagedAdamW([p for p in fast.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    opt_s.zero_grad(set_to_none=True)
    opt_f.zero_grad(set_to_none=True)
    for x in batches:
        ls = stock(input_ids=x, labels=x).loss
        ls.backward()
        opt_s.step()
        opt_s.zero_grad(set_to_none=True)
        lf = fast(input_ids=x, labels=x).loss
        lf.backward()
        opt_f.step()
        opt_f.zero_grad(set_to_none=True)
        assert abs(float(lf) - float(ls)) / float(ls) < 0.01


@pytest.mark.parametrize("piece_bytes", [1000, 64 * 1024**2])
def test_offloaded_inputs_come_back_whole_from_many_host_pieces(checkpoint, monkeypatch, piece_bytes) -> None:
    """Layer inputs go to host memory in pieces (recompute.HOST_PIECE_BYTES): with pieces of 1,000
    bytes a 2 x 64 x 256 input is 66 copies, the last one short; the gradients equal full recompute's."""
    from qlora_plugin.fastpath.kernels import recompute

    monkeypatch.setattr(recompute, "HOST_PIECE_BYTES", piece_bytes)
    x = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(5)).to(DEV)
    results = []
    for mode in ("full", "offload"):
        model = lora(load_4bit(checkpoint, DEV), stock=False)
        apply_fast_path(model, config=FastPathConfig(recompute=mode))
        model.train()
        for _ in range(2):  # the second step reuses the pinned pieces of the first
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
        results.append((float(loss), lora_grads(model)))
    (loss_full, grads_full), (loss_offload, grads_offload) = results
    assert abs(loss_offload - loss_full) <= 1e-6 * abs(loss_full)
    for key, grad in grads_full.items():
        assert rel_err(grads_offload[key], grad) < 1e-6, key


def _fast_model(checkpoint, graphs: bool, dropout: float = 0.0):
    model = lora(load_4bit(checkpoint, DEV), stock=False, dropout=dropout)
    rep = apply_fast_path(
        model, config=FastPathConfig(recompute="none", cache_block_constants=True, cuda_graphs=graphs)
    )
    assert rep.graphed_layers == (3 if graphs else 0)
    model.train()
    return model


def test_decoder_graphs_train_like_eager_and_step_aside_for_other_shapes(checkpoint) -> None:
    eager, graphed = _fast_model(checkpoint, False), _fast_model(checkpoint, True)
    controller = graphed.get_base_model().model.layers[0].__dict__["_qlora_decoder_graphs"]
    opts = [
        PagedAdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0) for m in (eager, graphed)
    ]
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, VOCAB, (2, 64), generator=g).to(DEV) for _ in range(6)]
    for step, x in enumerate(batches):
        results = []
        for m, opt in zip((eager, graphed), opts, strict=False):
            loss = m(input_ids=x, labels=x).loss
            loss.backward()
            results.append((float(loss), lora_grads(m)))
            opt.step()
            opt.zero_grad(set_to_none=True)
        (loss_e, grads_e), (loss_g, grads_g) = results
        assert abs(loss_g - loss_e) / loss_e < 1e-2, (step, loss_e, loss_g)
        for k in grads_e:
            assert rel_err(grads_g[k], grads_e[k]) < 3e-2, (step, k)
    assert controller.graphed is not None and controller.replays == len(batches) - 1  # captured at the 2nd batch

    # Trainer hands its token count down to the layers (when the trainer owns the loss): still a replay
    decoder = graphed.get_base_model().model
    count = torch.tensor(7, device=DEV)
    decoder(input_ids=batches[0], num_items_in_batch=count).last_hidden_state.float().sum().backward()
    graphed.zero_grad(set_to_none=True)
    assert controller.replays == len(batches), controller.eager_because

    with torch.no_grad():  # inference runs eagerly
        graphed.eval()
        graphed(input_ids=batches[0])
        graphed.train()
    assert controller.replays == len(batches)

    longer = torch.randint(0, VOCAB, (2, 96), generator=g).to(DEV)
    loss = graphed(input_ids=longer, labels=longer).loss
    loss.backward()
    assert controller.graphed is None and "shapes" in controller.disabled_because
    assert torch.isfinite(loss)


def test_decoder_graphs_run_eagerly_when_two_forwards_share_one_backward(checkpoint) -> None:
    eager, graphed = _fast_model(checkpoint, False), _fast_model(checkpoint, True)
    controller = graphed.get_base_model().model.layers[0].__dict__["_qlora_decoder_graphs"]
    g = torch.Generator().manual_seed(6)
    x1, x2 = (torch.randint(0, VOCAB, (2, 64), generator=g).to(DEV) for _ in range(2))
    for _ in range(2):  # the second forward captures
        graphed(input_ids=x1, labels=x1).loss.backward()
    graphed.zero_grad(set_to_none=True)
    assert controller.graphed is not None
    grads = []
    for m in (eager, graphed):  # gradient accumulation over two forwards, one backward
        (m(input_ids=x1, labels=x1).loss + m(input_ids=x2, labels=x2).loss).backward()
        grads.append(lora_grads(m))
        m.zero_grad(set_to_none=True)
    assert "before the previous" in controller.eager_because
    for k in grads[0]:
        assert rel_err(grads[1][k], grads[0][k]) < 3e-2, k
    replays = controller.replays
    graphed(input_ids=x1, labels=x1).loss.backward()  # the usual order again: a replay
    assert controller.replays == replays + 1


def test_decoder_graphs_capture_dropout_and_draw_new_masks_at_each_replay(checkpoint) -> None:
    model = _fast_model(checkpoint, True, dropout=0.2)
    eager = _fast_model(checkpoint, False, dropout=0.2)
    controller = model.get_base_model().model.layers[0].__dict__["_qlora_decoder_graphs"]
    x = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(9)).to(DEV)
    losses, eager_losses = [], []
    for _ in range(5):
        loss = model(input_ids=x, labels=x).loss  # the last step's loss is still alive here, as in most loops
        loss.backward()
        model.zero_grad(set_to_none=True)
        losses.append(float(loss))
        eager_loss = eager(input_ids=x, labels=x).loss
        eager_losses.append(float(eager_loss))
    assert controller.graphed is not None and controller.replays == 4, controller.disabled_because
    assert len(set(losses[1:])) == 4, losses  # same batch and weights: each replay draws new masks
    mean = sum(losses) / len(losses)
    eager_mean = sum(eager_losses) / len(eager_losses)
    assert abs(mean - eager_mean) / eager_mean < 2e-2, (losses, eager_losses)  # same dropout, other masks
    with torch.no_grad():
        assert torch.isfinite(torch.nn.functional.dropout(x.float(), 0.5)).all()  # the CUDA generator still works


def test_decoder_graphs_capture_while_an_earlier_loss_is_alive(checkpoint) -> None:
    eager, graphed = _fast_model(checkpoint, False), _fast_model(checkpoint, True)
    controller = graphed.get_base_model().model.layers[0].__dict__["_qlora_decoder_graphs"]
    x = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(3)).to(DEV)
    kept = []
    for _ in range(3):
        loss = graphed(input_ids=x, labels=x).loss
        loss.backward()
        kept.append(loss)  # kept with its graph, which holds the parameters' gradient accumulators
    ref = eager(input_ids=x, labels=x).loss
    ref.backward()
    assert controller.graphed is not None and controller.replays == 2, controller.disabled_because
    grads, ref_grads = lora_grads(graphed), lora_grads(eager)
    for k in ref_grads:  # three accumulated backwards against one
        assert rel_err(grads[k], 3 * ref_grads[k]) < 3e-2, k


def _small_sdpa_llama(dtype: torch.dtype) -> torch.nn.Module:
    """A seeded two-layer Llama with SDPA attention on the GPU, in training mode, for the packed-attention tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).to(DEV, dtype).train()


@pytest.mark.parametrize("lengths", [[512, 1024, 512], [2048, 2048, 2048, 2048], [37, 5, 900, 1, 101]])
def test_packed_attention_cuda_matches_separate_sequences(lengths) -> None:
    """bf16 on CUDA: varlen flash attention over a packed row against each sequence on its own."""
    from qlora_plugin.fastpath.kernels.attention import _varlen_function, use_packed_attention

    model = _small_sdpa_llama(torch.bfloat16)
    ids = torch.randint(0, 1000, (1, sum(lengths)), device=DEV)
    positions = torch.cat([torch.arange(n, device=DEV) for n in lengths])[None]
    with torch.no_grad():
        separate = torch.cat([model(input_ids=part).logits for part in ids.split(lengths, dim=1)], dim=1).float()
        use_packed_attention(model)
        packed = model(input_ids=ids, position_ids=positions).logits.float()
    assert _varlen_function()[0] is not None, "torch's varlen attention should serve this PyTorch"
    assert rel_err(packed, separate) < 1e-2


def test_packed_attention_cuda_in_float32_avoids_the_flash_kernel() -> None:
    """float32 on CUDA (``compute_dtype="float32"``, packing): per-length SDPA, since flash varlen refuses fp32."""
    from qlora_plugin.fastpath.kernels.attention import use_packed_attention

    model = _small_sdpa_llama(torch.float32)
    lengths = [37, 5, 300, 1, 101]
    ids = torch.randint(0, 1000, (1, sum(lengths)), device=DEV)
    positions = torch.cat([torch.arange(n, device=DEV) for n in lengths])[None]
    with torch.no_grad():
        separate = torch.cat([model(input_ids=part).logits for part in ids.split(lengths, dim=1)], dim=1)
        use_packed_attention(model)
        packed = model(input_ids=ids, position_ids=positions).logits
    assert rel_err(packed, separate) < 1e-4


@pytest.mark.parametrize(
    "rows, hidden_size, vocab", [(2048, 4096, 128256), (2048, 2048, 128256), (333, 64, 5000), (5, 96, 4099)]
)
@pytest.mark.parametrize("counted", ["all", "some", "none"])
def test_loss_with_stats_matches_float64(rows, hidden_size, vocab, counted) -> None:
    """The Triton loss with TRL's statistics (bf16 GEMMs, chunked) against float64 autograd over the same inputs."""
    from qlora_plugin.fastpath.kernels.loss_stats import linear_cross_entropy_stats, row_stats_reference

    hidden = (torch.randn(rows, hidden_size, device=DEV) * 2).to(torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, device=DEV) / hidden_size**0.5).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device=DEV)
    if counted == "some":
        targets[torch.rand(rows, device=DEV) < 0.4] = -100
    elif counted == "none":
        targets[:] = -100
    stats = linear_cross_entropy_stats(hidden, weight, targets)
    (stats.loss * 3.0).backward()
    h64 = hidden.detach().double().requires_grad_(True)
    logits = h64 @ weight.double().t()
    n_valid = int((targets != -100).sum())
    want = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / max(n_valid, 1)
    (want * 3.0).backward()
    _, entropy, correct = row_stats_reference(logits.detach(), targets)
    assert int(stats.num_valid_tokens) == n_valid
    if n_valid == 0:
        assert float(stats.loss) == 0.0 and not hidden.grad.any()
        return
    assert rel_err(stats.loss.detach().double(), want.detach()) < 5e-3
    assert rel_err(stats.entropy_sum.double(), entropy.sum()) < 5e-3
    assert abs(float(stats.num_correct_tokens) - float(correct.sum())) <= max(2, 0.01 * n_valid)  # bf16 ties
    assert rel_err(hidden.grad.double(), h64.grad) < 2e-2


@pytest.mark.parametrize("rows, hidden_size, vocab", [(2048, 4096, 128256), (333, 64, 5000), (5, 96, 4099)])
def test_per_token_log_probs_match_float64_under_a_token_weighting(rows, hidden_size, vocab) -> None:
    """The Triton per-token path (TRL 1.15+'s fused LM head fields, bf16 GEMMs, chunked) against float64
    autograd, under a per-token weighting of the log-probabilities as TRL's dft loss applies."""
    from qlora_plugin.fastpath.kernels.loss_stats import linear_token_log_probs, row_stats_reference

    hidden = (torch.randn(rows, hidden_size, device=DEV) * 2).to(torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, device=DEV) / hidden_size**0.5).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device=DEV)
    targets[torch.rand(rows, device=DEV) < 0.4] = -100
    weights = torch.rand(rows, device=DEV)
    got = linear_token_log_probs(hidden, weight, targets)
    (got.log_probs * weights).sum().backward()
    h64 = hidden.detach().double().requires_grad_(True)
    logits = h64 @ weight.double().t()
    want = -torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
    (want * weights.double()).sum().backward()
    _, entropy, correct = row_stats_reference(logits.detach(), targets)
    ignored = targets == -100
    assert (got.log_probs[ignored] == 0).all() and not got.is_top1[ignored].any()
    assert rel_err(got.log_probs.detach().double(), want.detach()) < 5e-3
    assert rel_err(got.entropy.double(), entropy.double()) < 5e-3
    assert (got.is_top1 != correct.bool()).sum() <= max(2, rows // 100)  # bf16 ties
    assert rel_err(hidden.grad.double(), h64.grad) < 2e-2


def test_offload_keeps_what_the_host_has_no_room_for_on_the_gpu_with_full_recomputes_gradients(
    checkpoint, monkeypatch, caplog
) -> None:
    """Host memory reported short: the first layers' inputs stay on the GPU (one log line), the rest go to the
    host, and loss and gradients equal full recompute's."""
    import logging

    from qlora_plugin.fastpath import stash_plan
    from qlora_plugin.fastpath.kernels import recompute

    x = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(6)).to(DEV)
    per_layer = 2 * 64 * lora(load_4bit(checkpoint, DEV), stock=False).config.hidden_size * 2
    # room for exactly one layer input beyond the reserve
    monkeypatch.setattr(recompute, "host_memory", lambda: (stash_plan.HOST_RESERVE_MIN + per_layer, 8 * stash_plan.GIB))
    monkeypatch.setattr(recompute, "HOST_PIECE_BYTES", 4096)
    results = []
    for mode in ("full", "offload"):
        model = lora(load_4bit(checkpoint, DEV), stock=False)
        apply_fast_path(model, config=FastPathConfig(recompute=mode))
        model.train()
        with caplog.at_level(logging.INFO, logger="qlora_plugin"):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
        results.append((float(loss), lora_grads(model)))
    assert "keeps the first" in caplog.text and "on the GPU" in caplog.text
    (loss_full, grads_full), (loss_offload, grads_offload) = results
    assert abs(loss_offload - loss_full) <= 1e-6 * abs(loss_full)
    for key, grad in grads_full.items():
        assert rel_err(grads_offload[key], grad) < 1e-6, key


def test_offload_refuses_a_step_that_fits_neither_side_before_a_layer_runs(checkpoint, monkeypatch) -> None:
    from qlora_plugin.fastpath import stash_plan
    from qlora_plugin.fastpath.kernels import recompute

    monkeypatch.setattr(recompute, "host_memory", lambda: (0, 8 * stash_plan.GIB))
    monkeypatch.setattr(stash_plan, "GPU_RESERVE", 10**15)  # no GPU room either
    model = lora(load_4bit(checkpoint, DEV), stock=False)
    apply_fast_path(model, config=FastPathConfig(recompute="offload"))
    model.train()
    x = torch.randint(0, VOCAB, (2, 64), device=DEV)
    with pytest.raises(stash_plan.StashTooLarge, match="shorten max_length"):
        model(input_ids=x, labels=x)
