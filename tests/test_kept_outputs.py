"""Selective recompute (qlora_plugin.fastpath.kernels.kept_outputs): the MLP's gate and up outputs kept.

Real bitsandbytes NF4 layers and PEFT LoRA layers on a tiny Llama through the fast path's PyTorch
references (CPU; offloaded recompute on CUDA). A model whose checkpointed layers keep their gate and
up outputs must give the loss and every LoRA gradient of the model that recomputes them, with LoRA
dropout too (the recompute draws the same masks), and must dequantize those weights once less a
step: that is the time it saves.
"""

from __future__ import annotations

import pytest
import torch
from _tiny_qlora import VOCAB, load_4bit, lora, lora_grads, rel_err, tiny_llama_checkpoint

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from qlora_plugin.core.environment import read_knobs  # noqa: E402
from qlora_plugin.fastpath.kernels import (  # noqa: E402
    FastPathConfig,
    apply_fast_path,
    kept_outputs,  # noqa: E402
)
from qlora_plugin.fastpath.kernels.dequant import dequantize_4bit  # noqa: E402
from qlora_plugin.fastpath.kernels.kept_outputs import (  # noqa: E402
    KeptOutputs,
    keep_mlp_outputs,
    layers_keeping_mlp_outputs,
    offer_output,
    reusable_output,
)
from qlora_plugin.fastpath.kernels.lora_linear import LayerOptions  # noqa: E402
from qlora_plugin.fastpath.kernels.recompute import set_recompute  # noqa: E402

SEQ = 48


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    return tiny_llama_checkpoint(tmp_path_factory.mktemp("tiny") / "llama")


class _Counted:
    """Counts dequantizations per projection name (gate_proj, up_proj, ...)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def install(self, model: torch.nn.Module) -> None:
        for name, module in model.named_modules():
            if "_qlora_layer_options" in module.__dict__:
                kind = name.rsplit(".", 1)[-1]

                def dequant(weight, state, dtype, _kind=kind):
                    self.calls[_kind] = self.calls.get(_kind, 0) + 1
                    return dequantize_4bit(weight, state, dtype)

                module.__dict__["_qlora_layer_options"] = LayerOptions(dequant=dequant)


def _model(
    checkpoint,
    *,
    keep: int,
    park: int = 0,
    recompute: str = "full",
    dropout: float = 0.0,
    tiled: bool = False,
    own: bool = True,
):
    model = lora(load_4bit(checkpoint), stock=False, dropout=dropout)
    config = FastPathConfig(
        compute_dtype=torch.float32,
        recompute=recompute,
        own_recompute=own,
        keep_mlp_layers=keep,
        park_mlp_layers=park,
        tiled_mlp_min_tokens=64 if tiled else 0,
        tiled_mlp_rows=40,
    )
    report = apply_fast_path(model, config=config)
    assert report.mlp_outputs_kept == (0 if recompute == "none" else min(keep + park, 2))
    assert report.mlp_outputs_parked == (0 if recompute == "none" else min(park, 2))
    counted = _Counted()
    counted.install(model)
    return model.train(), counted


def _step(model, seed: int = 3) -> tuple[float, dict[str, torch.Tensor]]:
    batch = torch.randint(0, VOCAB // 4, (2, SEQ), generator=torch.Generator().manual_seed(11))
    torch.manual_seed(seed)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return float(loss.detach()), lora_grads(model)


def _assert_same(got, want, tol: float) -> None:
    assert abs(got[0] - want[0]) <= tol * abs(want[0])
    assert got[1].keys() == want[1].keys() and len(want[1]) == 28  # 2 layers x 7 projections x (A, B)
    for key in want[1]:
        assert want[1][key].abs().sum() > 0, key
        assert rel_err(got[1][key], want[1][key]) <= tol, key


@pytest.mark.parametrize("own", [True, False], ids=["own-recompute", "torch-checkpoint"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("keep", [1, 2])
def test_kept_gate_and_up_give_the_recomputed_loss_and_gradients(checkpoint, keep, dropout, own) -> None:
    recomputing, plain = _model(checkpoint, keep=0, dropout=dropout, own=own)
    keeping, counted = _model(checkpoint, keep=keep, dropout=dropout, own=own)
    want = _step(recomputing)
    got = _step(keeping)
    _assert_same(got, want, tol=1e-6)
    # per layer and projection: forward, recompute, backward; a keeping layer skips the recompute's
    assert plain.calls["gate_proj"] == plain.calls["up_proj"] == 2 * 3
    assert counted.calls["gate_proj"] == counted.calls["up_proj"] == 2 * 3 - keep
    assert counted.calls["down_proj"] == counted.calls["o_proj"] == 2 * 3
    # and the masks matter: another draw changes the gradients, so the equality above is not vacuous
    if dropout:
        keeping.zero_grad(set_to_none=True)
        other = _step(keeping, seed=4)
        assert max(rel_err(other[1][k], want[1][k]) for k in want[1]) > 1e-2


@pytest.fixture
def stores(monkeypatch) -> list[KeptOutputs]:
    """Every store the checkpointed calls make from now on."""
    made: list[KeptOutputs] = []

    class Recorded(KeptOutputs):
        def __init__(self, lot=None) -> None:
            super().__init__(lot)
            made.append(self)

    monkeypatch.setattr(kept_outputs, "KeptOutputs", Recorded)  # new_store makes them for either recompute
    return made


def test_each_call_keeps_until_its_own_recompute_and_nothing_after(checkpoint, stores) -> None:
    keeping, counted = _model(checkpoint, keep=2, dropout=0.1)
    batch = torch.ones(2, SEQ, dtype=torch.long)
    loss = keeping(input_ids=batch, labels=batch).loss
    assert [len(s.outputs) for s in stores] == [2, 2]  # one store per layer call, gate and up in each
    loss.backward()
    assert all(not s.outputs for s in stores)
    # an evaluation forward (no gradients) keeps nothing
    with torch.no_grad():
        keeping.eval()(input_ids=torch.ones(1, 8, dtype=torch.long))
    assert all(not s.outputs for s in stores)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize(("keep", "park"), [(0, 1), (1, 1), (0, 2)])
def test_parked_gate_and_up_give_the_recomputed_loss_and_gradients(checkpoint, keep, park, dropout) -> None:
    """Outputs parked on the host (a copy on the CPU here, pinned memory on CUDA) come back unchanged."""
    want = _step(_model(checkpoint, keep=0, dropout=dropout)[0])
    parking, counted = _model(checkpoint, keep=keep, park=park, dropout=dropout)
    _assert_same(_step(parking), want, tol=1e-6)
    assert counted.calls["gate_proj"] == counted.calls["up_proj"] == 2 * 3 - min(keep + park, 2)


def test_parked_outputs_wait_on_the_host_and_the_previous_call_comes_back_early(checkpoint, stores) -> None:
    parking, _ = _model(checkpoint, keep=0, park=2)
    seen: list[tuple[int, int, int]] = []  # at each recompute's start: (store, its outputs, earlier store's arriving)
    assert not stores
    batch = torch.ones(2, SEQ, dtype=torch.long)
    loss = parking(input_ids=batch, labels=batch).loss
    assert [(len(s.outputs), len(s.parked)) for s in stores] == [(0, 2), (0, 2)]  # nothing of them on the device
    assert stores[1].previous is not None and stores[1].previous() is stores[0]
    for index, store in enumerate(stores):
        original = store._bring_back

        def watched(index=index, original=original) -> None:
            original()
            seen.append((index, len(stores[index].outputs), len(stores[0].arriving)))

        store._bring_back = watched
    loss.backward()
    # backward runs the last layer first: its recompute gets its own outputs back and starts the first layer's
    assert seen == [(1, 2, 2), (0, 2, 0)]
    assert all(not (s.outputs or s.parked or s.arriving) for s in stores)


@pytest.mark.parametrize("own", [True, False], ids=["own-recompute", "torch-checkpoint"])
@pytest.mark.parametrize("between", ["grad", "no-grad"])
def test_a_second_forward_before_the_backward_does_not_lend_its_outputs(checkpoint, between, own) -> None:
    """Two forwards of the same shape, then the first one's backward (or a no-grad pass in between).

    The first backward's recompute must take the first forward's outputs, not the second's.
    """

    def losses(model) -> tuple[float, dict[str, torch.Tensor]]:
        first = torch.randint(0, VOCAB // 4, (2, SEQ), generator=torch.Generator().manual_seed(11))
        second = torch.randint(0, VOCAB // 4, (2, SEQ), generator=torch.Generator().manual_seed(12))
        torch.manual_seed(3)
        loss = model(input_ids=first, labels=first).loss
        if between == "grad":
            later = model(input_ids=second, labels=second).loss
            loss.backward()
            later.backward()
            loss = loss + later
        else:
            with torch.no_grad():
                model(input_ids=second, labels=second)
            loss.backward()
        return float(loss.detach()), lora_grads(model)

    want = losses(_model(checkpoint, keep=0, dropout=0.1, own=own)[0])
    for keep, park in ((2, 0), (1, 1)):
        keeping, counted = _model(checkpoint, keep=keep, park=park, dropout=0.1, own=own)
        _assert_same(losses(keeping), want, tol=1e-6)
        # per layer: each grad forward dequantizes in forward and backward (its recompute reuses), the
        # no-grad pass once
        assert counted.calls["gate_proj"] == {"grad": 2 * 2 * 2, "no-grad": 2 * 2 + 2}[between]


def test_a_tiled_mlp_call_keeps_nothing(checkpoint, stores) -> None:
    """Rows long enough to tile the MLP: the slices recompute as before, the result is unchanged."""
    recomputing, plain = _model(checkpoint, keep=0, tiled=True, dropout=0.1)
    keeping, counted = _model(checkpoint, keep=2, tiled=True, dropout=0.1)
    _assert_same(_step(keeping), _step(recomputing), tol=1e-6)
    assert counted.calls == plain.calls
    # between forward and backward nothing is held (untiled, each layer call holds its two outputs)
    batch = torch.ones(2, SEQ, dtype=torch.long)
    for model, held in ((keeping, 0), (_model(checkpoint, keep=2)[0], 2)):
        stores.clear()
        loss = model(input_ids=batch, labels=batch).loss
        assert [len(s.outputs) for s in stores] == [held, held]
        loss.backward()


def test_without_recompute_nothing_is_marked(checkpoint) -> None:
    model, counted = _model(checkpoint, keep=2, recompute="none")
    assert not any("_qlora_keeps_output" in m.__dict__ for m in model.modules())
    # and setting recompute again undoes an earlier setting's marks
    set_recompute(model, "full", keep_mlp_layers=2)
    assert layers_keeping_mlp_outputs(model) == 2
    set_recompute(model, "none", keep_mlp_layers=2)
    assert layers_keeping_mlp_outputs(model) == 0
    _step(model)
    assert counted.calls["gate_proj"] == 2 * 2  # forward and backward


def test_a_kept_output_is_used_only_in_the_recompute_and_only_at_its_shape() -> None:
    projection = torch.nn.Linear(4, 6)
    assert keep_mlp_outputs([torch.nn.ModuleDict({"gate_proj": projection}), torch.nn.Linear(2, 2)], 2) == [True, False]
    store = KeptOutputs()
    out = torch.randn(5, 6)
    offer_output(projection, out)  # outside any phase: ignored
    assert not store.outputs
    with store.keeping():
        offer_output(projection, out)
        assert reusable_output(projection, 5, 6, out.dtype) is None  # not in the first forward
    for rows, features, dtype in [(4, 6, out.dtype), (5, 7, out.dtype), (5, 6, torch.float16)]:
        with store.keeping():
            offer_output(projection, out)
        with store.reusing():
            assert reusable_output(projection, rows, features, dtype) is None
    with store.keeping():
        offer_output(projection, out)
    with store.reusing():
        kept = reusable_output(projection, 5, 6, out.dtype)
        assert kept is not None and torch.equal(kept, out)
        assert reusable_output(projection, 5, 6, out.dtype) is None  # taken once
    assert not store.outputs
    # an unmarked projection neither hands over nor takes back
    other = torch.nn.Linear(4, 6)
    with store.keeping():
        offer_output(other, out)
    assert not store.outputs
    # count 0 removes the marks
    assert keep_mlp_outputs([torch.nn.ModuleDict({"gate_proj": projection})], 0) == [False]
    assert "_qlora_keeps_output" not in projection.__dict__


def test_the_knob_reaches_the_fast_path_config(monkeypatch) -> None:
    from qlora_plugin import qlora_recipe
    from qlora_plugin.build.context import make_context
    from qlora_plugin.fastpath.kernel_choice import kernel_config

    assert read_knobs({"QLORA_KEEP_MLP_LAYERS": "12"}).keep_mlp_layers == 12
    knobs = read_knobs({"QLORA_KEEP_MLP_LAYERS": "many"})
    assert knobs.keep_mlp_layers == 0 and "QLORA_KEEP_MLP_LAYERS='many'" in knobs.problems[0]
    monkeypatch.setenv("QLORA_KEEP_MLP_LAYERS", "5")
    full = make_context(qlora_recipe())
    assert kernel_config(full, "cuda").keep_mlp_layers == 5
    speed = make_context(qlora_recipe(gradient_checkpointing=False))
    assert kernel_config(speed, "cuda").keep_mlp_layers == 0
    # parking: CUDA only (pinned host memory and a side stream), and only under recompute
    assert read_knobs({"QLORA_PARK_MLP_LAYERS": "7"}).park_mlp_layers == 7
    assert "QLORA_PARK_MLP_LAYERS='-1'" in read_knobs({"QLORA_PARK_MLP_LAYERS": "-1"}).problems[0]
    monkeypatch.setenv("QLORA_PARK_MLP_LAYERS", "4")
    assert kernel_config(make_context(qlora_recipe()), "cuda").park_mlp_layers == 4
    assert kernel_config(make_context(qlora_recipe()), "cpu").park_mlp_layers == 0
    assert kernel_config(make_context(qlora_recipe(gradient_checkpointing=False)), "cuda").park_mlp_layers == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloaded recompute needs CUDA")
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_kept_outputs_under_offloaded_recompute_on_cuda(tmp_path, dropout) -> None:
    path = tiny_llama_checkpoint(tmp_path / "llama")

    def step(keep: int, park: int = 0, recompute: str = "offload", own: bool = True):
        m = lora(load_4bit(path, device="cuda"), stock=False, dropout=dropout)
        config = FastPathConfig(recompute=recompute, keep_mlp_layers=keep, park_mlp_layers=park, own_recompute=own)
        assert apply_fast_path(m, config=config).mlp_outputs_parked == park
        m.train()
        batch = torch.randint(0, VOCAB // 4, (2, SEQ), generator=torch.Generator().manual_seed(11)).cuda()
        torch.manual_seed(3)
        loss = m(input_ids=batch, labels=batch).loss
        loss.backward()
        return float(loss), lora_grads(m)

    want = step(0)
    _assert_same(step(2), want, tol=1e-6)
    # parked in pinned host memory on a side stream, brought back one layer ahead
    _assert_same(step(1, park=1), want, tol=1e-6)
    _assert_same(step(0, park=2), want, tol=1e-6)
    _assert_same(step(0, park=2, recompute="full"), step(0, recompute="full"), tol=1e-6)
    # the plugin's own recompute against torch's checkpoint, inputs on the GPU and offloaded
    for mode in ("full", "offload"):
        _assert_same(step(0, recompute=mode), step(0, recompute=mode, own=False), tol=1e-6)
        _assert_same(step(2, recompute=mode), step(0, recompute=mode, own=False), tol=1e-6)
