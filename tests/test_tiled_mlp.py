"""The tiled MLP (qlora_plugin.fastpath.kernels.tiled_mlp): the untiled result, one slice at a time.

Real bitsandbytes NF4 layers and PEFT LoRA layers on a tiny Llama through the fast path's
PyTorch references (CPU). With LoRA dropout off, the tiled model's loss and every LoRA
gradient equal the untiled model's; with dropout on, the slices draw their own masks, so
the tiled model is compared with the same slices through plain autograd (which keeps
every slice's activations): equal only if each slice's recompute draws its forward's masks.
"""

from __future__ import annotations

import functools
import logging
import types

import pytest
import torch
from _tiny_qlora import VOCAB, load_4bit, lora, lora_grads, rel_err, tiny_llama_checkpoint

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from qlora_plugin.fastpath.kernels import FastPathConfig, apply_fast_path  # noqa: E402
from qlora_plugin.fastpath.kernels.layers import patched_mlps, swiglu_mlp  # noqa: E402
from qlora_plugin.fastpath.kernels.tiled_mlp import (  # noqa: E402
    OPTIONS,
    TiledMLPOptions,
    chunked_mlp_reference,
    tiled_mlp,
    tiling_rows,
)

SEQ = 48  # two rows of 48 tokens: 96 tokens a step
ROWS = 40  # slices of 40, 40 and 16 tokens (the last one short)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    return tiny_llama_checkpoint(tmp_path_factory.mktemp("tiny") / "llama")


def _model(checkpoint, *, tiled: bool, recompute: str, dropout: float):
    """The fast path in float32 (bf16 would hide reordering-sized differences only behind a loose tolerance)."""
    model = lora(load_4bit(checkpoint), stock=False, dropout=dropout)
    config = FastPathConfig(
        compute_dtype=torch.float32,
        recompute=recompute,
        tiled_mlp_min_tokens=64 if tiled else 0,
        tiled_mlp_rows=ROWS,
    )
    report = apply_fast_path(model, config=config)
    assert report.mlps_patched == 2 and report.tiled_mlps == (2 if tiled else 0)
    model.train()
    return model


def _step(model, seed: int = 3) -> float:
    batch = torch.randint(0, VOCAB // 4, (2, SEQ), generator=torch.Generator().manual_seed(11))
    torch.manual_seed(seed)  # the dropout masks of both models come from the same generator state
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return float(loss.detach())


def _options(model) -> TiledMLPOptions:
    return patched_mlps(model)[0].__dict__[OPTIONS]


def _assert_same(got, want, *, tol: float) -> None:
    loss_got, grads_got = got
    loss_want, grads_want = want
    assert abs(loss_got - loss_want) <= tol * abs(loss_want)
    assert grads_got.keys() == grads_want.keys()
    mlp_grads = [k for k in grads_want if any(p in k for p in ("gate_proj", "up_proj", "down_proj"))]
    assert len(mlp_grads) == 12  # 2 layers x 3 projections x (A, B)
    for key in grads_want:
        assert grads_want[key].abs().sum() > 0, key
        assert rel_err(grads_got[key], grads_want[key]) <= tol, key


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_tiled_mlp_gives_the_untiled_loss_and_gradients(checkpoint, recompute, caplog) -> None:
    untiled = _model(checkpoint, tiled=False, recompute=recompute, dropout=0.0)
    tiled = _model(checkpoint, tiled=True, recompute=recompute, dropout=0.0)
    with caplog.at_level(logging.INFO, logger="qlora_plugin"):
        result = (_step(tiled), lora_grads(tiled))
        _step(tiled)  # a second step logs nothing more
    want = (_step(untiled), lora_grads(untiled))
    _assert_same(result, want, tol=1e-5)
    options = _options(tiled)
    assert options.slices == 3  # 96 tokens in slices of 40
    # each step's forward goes through the 2 MLPs once, plus once more per layer under full recompute
    assert options.calls == 2 * (4 if recompute == "full" else 2)
    assert _options(untiled).calls == 0
    assert sum("tiled MLP" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_tiled_mlp_recomputes_each_slice_with_its_own_dropout_masks(checkpoint, recompute) -> None:
    reference = _model(checkpoint, tiled=True, recompute=recompute, dropout=0.3)
    for mlp in patched_mlps(reference):  # the same slices through plain autograd, nothing recomputed
        run = functools.partial(swiglu_mlp, mlp)
        mlp.forward = types.MethodType(lambda self, x, *a, _run=run, **k: chunked_mlp_reference(_run, x, ROWS), mlp)
    tiled = _model(checkpoint, tiled=True, recompute=recompute, dropout=0.3)
    want = (_step(reference), lora_grads(reference))
    got = (_step(tiled), lora_grads(tiled))
    assert _options(tiled).slices == 3
    _assert_same(got, want, tol=1e-6)
    # and the masks matter: another draw gives other gradients
    tiled.zero_grad(set_to_none=True)
    other = (_step(tiled, seed=4), lora_grads(tiled))
    assert max(rel_err(other[1][k], want[1][k]) for k in want[1]) > 1e-2


def test_tiled_function_matches_plain_autograd_in_float64() -> None:
    torch.manual_seed(0)
    gate, up, down = (torch.nn.Linear(8, 24).double(), torch.nn.Linear(8, 24).double(), torch.nn.Linear(24, 8).double())
    params = [p for m in (gate, up, down) for p in m.parameters()]

    def run(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.dropout(x, 0.5, training=True)
        return down(torch.nn.functional.silu(gate(x)) * up(x))

    x = torch.randn(3, 50, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 50, 8, dtype=torch.float64)
    results = []
    for fn in (lambda t: chunked_mlp_reference(run, t, 16), lambda t: tiled_mlp(run, t, params, 16)):
        torch.manual_seed(5)
        out = fn(x)
        grads = torch.autograd.grad(out, [x, *params], g)
        results.append((out.detach(), grads))
    (out_ref, grads_ref), (out_tiled, grads_tiled) = results
    assert torch.allclose(out_tiled, out_ref, rtol=0, atol=1e-12)
    for got, want in zip(grads_tiled, grads_ref, strict=True):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # no gradients: the slices simply run one after another
        torch.manual_seed(5)
        assert torch.allclose(tiled_mlp(run, x, params, 16), out_ref, rtol=0, atol=1e-12)


def test_tiling_turns_on_from_the_threshold_and_the_environment_sets_it(monkeypatch) -> None:
    options = TiledMLPOptions(rows=8192, min_tokens=32768)
    assert tiling_rows(options, 32767) == 0 and tiling_rows(options, 32768) == 8192
    assert tiling_rows(TiledMLPOptions(min_tokens=0), 10**6) == 0 and tiling_rows(None, 10**6) == 0

    from qlora_plugin import qlora_recipe
    from qlora_plugin.build.context import make_context
    from qlora_plugin.fastpath.kernel_choice import kernel_config

    def config(recipe, device):  # a run started now, under the environment as it is
        return kernel_config(make_context(recipe), device)

    recipe = qlora_recipe()
    assert config(recipe, "cpu").tiled_mlp_min_tokens == 32768
    monkeypatch.setenv("QLORA_TILED_MLP", "0")
    assert config(recipe, "cpu").tiled_mlp_min_tokens == 0
    monkeypatch.setenv("QLORA_TILED_MLP", "65536")
    assert config(recipe, "cpu").tiled_mlp_min_tokens == 65536
    # and the layer inputs offloaded recompute keeps on the GPU (offload is CUDA-only: "full" on a CPU)
    monkeypatch.setenv("QLORA_OFFLOAD_KEEP_LAYERS", "3")
    offload = qlora_recipe(gradient_checkpointing="offload")
    assert config(offload, "cuda").offload_keep_layers == 3
    assert config(offload, "cpu").offload_keep_layers == 0 and config(recipe, "cuda").offload_keep_layers == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloaded recompute and the Triton dropout need CUDA")
@pytest.mark.parametrize("dropout,keep", [(0.0, 0), (0.1, 0), (0.1, 1)])
def test_tiled_mlp_under_offloaded_recompute_on_cuda(tmp_path, dropout, keep) -> None:
    """Also with the first layer's input kept on the GPU (``keep``): the same result."""
    path = tiny_llama_checkpoint(tmp_path / "llama")

    def model(tiled: bool):
        m = lora(load_4bit(path, device="cuda"), stock=False, dropout=dropout)
        cfg = FastPathConfig(
            recompute="offload",
            tiled_mlp_min_tokens=64 if tiled else 0,
            tiled_mlp_rows=ROWS,
            offload_keep_layers=keep if tiled else 0,
        )
        apply_fast_path(m, config=cfg)
        if not tiled and dropout:  # the same slices through plain autograd
            for mlp in patched_mlps(m):
                run = functools.partial(swiglu_mlp, mlp)
                mlp.forward = types.MethodType(
                    lambda self, x, *a, _run=run, **k: chunked_mlp_reference(_run, x, ROWS), mlp
                )
        return m.train()

    def step(m):
        batch = torch.randint(0, VOCAB // 4, (2, SEQ), generator=torch.Generator().manual_seed(11)).cuda()
        torch.manual_seed(3)
        loss = m(input_ids=batch, labels=batch).loss
        loss.backward()
        return float(loss), lora_grads(m)

    _assert_same(step(model(True)), step(model(False)), tol=2e-3 if dropout == 0 else 1e-6)
