"""CUDA graphs over the recomputed layers (qlora_plugin.fastpath.kernels.recompute_graphs).

On a CPU each "replay" runs the captured function again over the same buffers, so these tests check
the bookkeeping a CUDA graph relies on: the static inputs and outputs chained from layer to layer,
the two gradient buffers taken in turns, the parameter gradients added to buffers bound as
``param.grad`` (with gradient accumulation, and both ways of zeroing), the forward's random state
put back for the recompute (the same dropout masks), and the cases that run eagerly or drop the
graphs. Each replayed step must give exactly the loss and gradients of the plugin's own recompute
without graphs. The CUDA test at the end compares real graph replays the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _tiny_qlora import VOCAB, load_4bit, lora, lora_grads, rel_err, tiny_llama_checkpoint

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from qlora_plugin.build.context import make_context  # noqa: E402
from qlora_plugin.core.recipe import qlora_recipe  # noqa: E402
from qlora_plugin.fastpath.kernel_choice import kernel_config  # noqa: E402
from qlora_plugin.fastpath.kernels import FastPathConfig, apply_fast_path  # noqa: E402
from qlora_plugin.fastpath.kernels.recompute_graphs import RecomputeGraphs  # noqa: E402

SEQ = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    return tiny_llama_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", layers=3)


def _model(checkpoint, *, graphs: bool, dropout: float, device: str = "cpu", **config):
    model = lora(load_4bit(checkpoint, device), stock=False, dropout=dropout)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    fast = FastPathConfig(compute_dtype=dtype, recompute="full", recompute_graphs=graphs, **config)
    report = apply_fast_path(model, config=fast)
    return model.train(), report


def _controller(model) -> RecomputeGraphs:
    layer = model.get_base_model().model.layers[0]
    graphs = layer._gradient_checkpointing_func.graphs
    assert isinstance(graphs, RecomputeGraphs)
    return graphs


def _batches(n: int, seq: int = SEQ, seed: int = 7, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, seq), generator=g).to(device) for _ in range(n)]


def _train(model, steps: list[list[torch.Tensor]], zero: Callable[[torch.nn.Module], None]):
    """One optimizer-free step per entry of ``steps`` (each a list of micro-batches, one backward each):
    the losses and the gradients after each step, then ``zero``."""
    results = []
    for step, micro in enumerate(steps):
        torch.manual_seed(100 + step)
        losses = []
        for batch in micro:
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            losses.append(float(loss.detach()))
        results.append((losses, lora_grads(model)))
        zero(model)
    return results


def _assert_same(got, want, tol: float) -> None:
    assert len(got) == len(want)
    for (losses_g, grads_g), (losses_w, grads_w) in zip(got, want, strict=True):
        for lg, lw in zip(losses_g, losses_w, strict=True):
            assert abs(lg - lw) <= tol * abs(lw), (lg, lw)
        assert grads_g.keys() == grads_w.keys() and grads_w
        for key in grads_w:
            assert grads_w[key].abs().sum() > 0, key
            assert rel_err(grads_g[key], grads_w[key]) <= tol, key


def _to_none(model) -> None:
    model.zero_grad(set_to_none=True)


def _to_zero(model) -> None:
    model.zero_grad(set_to_none=False)


@pytest.mark.parametrize("zero", [_to_none, _to_zero], ids=["set_to_none", "zeroed"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_replayed_layers_give_the_own_recomputes_losses_and_gradients(checkpoint, dropout, zero):
    steps = [[b] for b in _batches(2)] + [_batches(2, seed=8), _batches(2, seed=9)]  # then accumulation over two
    want = _train(_model(checkpoint, graphs=False, dropout=dropout)[0], steps, zero)
    model, report = _model(checkpoint, graphs=True, dropout=dropout)
    assert report.recompute_graphs == 3
    got = _train(model, steps, zero)
    controller = _controller(model)
    assert controller.captured is not None, controller.disabled_because or controller.eager_because
    assert controller.replays == 5  # the first forward of a shape runs eagerly, the second captures
    _assert_same(got, want, tol=1e-6)


def test_a_gradient_the_trainer_left_in_place_is_added_to(checkpoint):
    """A ``param.grad`` that is not the graphs' own buffer (a user's tensor) is loaded into it first."""
    steps = [[b] for b in _batches(3)]

    def replace(model) -> None:
        for p in model.parameters():
            if p.grad is not None:
                p.grad = p.grad.clone() * 0.5

    want = _train(_model(checkpoint, graphs=False, dropout=0.0)[0], steps, replace)
    got = _train(_model(checkpoint, graphs=True, dropout=0.0)[0], steps, replace)
    _assert_same(got, want, tol=1e-6)


def test_a_batch_of_another_shape_runs_eagerly_and_enough_of_them_drop_the_graphs(checkpoint):
    from qlora_plugin.fastpath.kernels.recompute_graphs import OTHER_SHAPES_BEFORE_DROP

    same = _batches(4)
    odd = _batches(OTHER_SHAPES_BEFORE_DROP, seq=SEQ + 8, seed=3)
    # capture at the 2nd batch; one odd batch (an epoch's last) keeps the graphs; then enough odd ones drop them
    steps = [[same[0]], [same[1]], [odd[0]], [same[2]], *([b] for b in odd), [same[3]]]
    want = _train(_model(checkpoint, graphs=False, dropout=0.2)[0], steps[:4], _to_none)
    model, _ = _model(checkpoint, graphs=True, dropout=0.2)
    got = _train(model, steps[:4], _to_none)
    controller = _controller(model)
    assert controller.captured is not None and controller.replays == 2
    _assert_same(got, want, tol=1e-6)
    want = _train(_model(checkpoint, graphs=False, dropout=0.2)[0], steps, _to_none)
    model, _ = _model(checkpoint, graphs=True, dropout=0.2)
    got = _train(model, steps, _to_none)
    controller = _controller(model)
    assert controller.captured is None and "shapes" in controller.disabled_because
    assert controller.replays == 2
    _assert_same(got, want, tol=1e-6)


def test_two_forwards_before_one_backward_run_eagerly(checkpoint):
    x1, x2 = _batches(2, seed=4)
    results = []
    for graphs in (False, True):
        model, _ = _model(checkpoint, graphs=graphs, dropout=0.2)
        for _ in range(2):  # the second forward captures
            model(input_ids=x1, labels=x1).loss.backward()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        loss = model(input_ids=x1, labels=x1).loss + model(input_ids=x2, labels=x2).loss
        loss.backward()
        results.append(([float(loss)], lora_grads(model)))
        if graphs:
            controller = _controller(model)
            assert "before the previous" in controller.eager_because
            replays = controller.replays
            model(input_ids=x1, labels=x1).loss.backward()  # the usual order again: a replay
            assert controller.replays == replays + 1
    _assert_same([results[1]], [results[0]], tol=1e-6)


def test_what_a_graph_cannot_hold_runs_eagerly(checkpoint):
    model, _ = _model(checkpoint, graphs=True, dropout=0.0)
    controller = _controller(model)
    x = _batches(1)[0]
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # padding: an attention mask reaches the layers
    for _ in range(3):
        model(input_ids=x, attention_mask=mask, labels=x).loss.backward()
    assert controller.captured is None and controller.eager_because == "an attention mask"
    with torch.no_grad():
        model(input_ids=x)
    assert controller.replays == 0

    hooked, _ = _model(checkpoint, graphs=True, dropout=0.0)
    hooked.get_base_model().model.layers[1].register_forward_hook(lambda *_: None)
    for _ in range(2):
        hooked(input_ids=x, labels=x).loss.backward()
    assert "hooks" in _controller(hooked).disabled_because and _controller(hooked).replays == 0


@pytest.mark.parametrize(
    "config",
    [{"own_recompute": False}, {"recompute_every": 2}, {"keep_mlp_layers": 1}, {"recompute": "none"}],
    ids=["torch-checkpoint", "every-2", "kept-outputs", "no-recompute"],
)
def test_graphs_serve_only_the_own_recompute_of_every_layer(checkpoint, config):
    config = {"recompute": "full", **config}
    model = lora(load_4bit(checkpoint), stock=False)
    report = apply_fast_path(model, config=FastPathConfig(compute_dtype=torch.float32, recompute_graphs=True, **config))
    assert report.recompute_graphs == 0


@pytest.mark.parametrize("graphs", ["", "0", "1"])
@pytest.mark.parametrize("knob", ["", "0", "1", "off"])
@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("checkpointing", [True, "offload", False])
def test_a_run_asks_for_recompute_graphs_on_cuda_at_full_recompute_where_switched_on(
    monkeypatch, device, checkpointing, knob, graphs
):
    """Off until measured on a GPU: ``QLORA_RECOMPUTE_GRAPHS=1`` asks for them, ``QLORA_CUDA_GRAPHS=0`` wins."""
    for name, value in (("QLORA_CUDA_GRAPHS", knob), ("QLORA_RECOMPUTE_GRAPHS", graphs)):
        monkeypatch.delenv(name, raising=False)
        if value:
            monkeypatch.setenv(name, value)
    config = kernel_config(make_context(qlora_recipe(gradient_checkpointing=checkpointing)), device)
    switched_on = knob in ("", "1") and graphs == "1"
    assert config.recompute_graphs == (device == "cuda" and config.recompute == "full" and switched_on)
    assert not (config.recompute_graphs and config.cuda_graphs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_cuda_graph_replays_draw_the_forwards_masks_in_the_recompute(checkpoint, dropout):
    """A replayed step against the same step run eagerly from the same CUDA random state."""
    model, report = _model(checkpoint, graphs=True, dropout=dropout, device="cuda")
    assert report.recompute_graphs == 3
    controller = _controller(model)
    batches = _batches(4, seq=64, device="cuda")
    for x in batches[:2]:  # the second forward captures
        model(input_ids=x, labels=x).loss.backward()
    model.zero_grad(set_to_none=True)
    assert controller.captured is not None, controller.disabled_because
    results = []
    for replay in (True, False):
        if not replay:
            controller.drop("test: the same step eagerly")
        torch.cuda.manual_seed(21)
        micro = []
        for x in batches[2:]:  # two micro-batches: the second adds to the graphs' gradient buffers
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            micro.append(float(loss))
        results.append((micro, lora_grads(model)))
        model.zero_grad(set_to_none=True)
    assert controller.replays == 3
    _assert_same([results[0]], [results[1]], tol=1e-3)


CAPTURED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "mixtral", "qwen2_moe")


@pytest.mark.parametrize("name", [*CAPTURED, "gpt2", "gpt_neox"])
def test_every_architecture_replays_or_stays_eager_with_the_same_gradients(name):
    """Each architecture the tests pin down (stock layers, dropout where its config has one), three
    steps of one shape: replayed where its decoder is ``model.layers``, eager elsewhere, and the
    gradients of the own recompute either way."""
    from architectures import two_layer_model

    from qlora_plugin.fastpath.kernels.recompute import set_recompute

    batch = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(7))
    results = []
    for graphs in (False, True):
        model = two_layer_model(name, dropout=0.2)
        set_recompute(model, "full", graphs=graphs)
        results.append(_train(model, [[batch]] * 3, _to_none))
    controller = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(controller, "model", None), "layers", None)
    recompute = getattr(layers[0], "_gradient_checkpointing_func", None) if layers is not None else None
    graphs_of = getattr(recompute, "graphs", None)
    if name in CAPTURED:
        assert graphs_of is not None and graphs_of.replays == 2, getattr(graphs_of, "eager_because", name)
    else:
        assert graphs_of is None
    _assert_same(results[1], results[0], tol=1e-6)


def test_the_fast_path_line_says_the_recomputed_layers_replay(checkpoint):
    from qlora_plugin.fastpath.wording import describe

    for graphs in (True, False):
        model, report = _model(checkpoint, graphs=graphs, dropout=0.0)
        config = FastPathConfig(compute_dtype=torch.float32, recompute="full", recompute_graphs=graphs)
        line = describe(report, config, qlora_recipe(), "loss", ())
        assert ("CUDA graphs over 3 recomputed layers" in line) is graphs, line


def test_a_capture_that_fails_warns_once_and_trains_on_through_the_own_recompute(checkpoint, monkeypatch, caplog):
    """A layer that cannot run as the graphs call it (here: layer 1's recompute function raises) leaves
    every layer on the own recompute, with one warning naming the failure."""
    from qlora_plugin.fastpath.kernels import recompute_graphs

    made = recompute_graphs._backward_function

    def failing(captured, call, index, autocast):
        function = made(captured, call, index, autocast)
        if index != 1:
            return function

        def broken() -> None:
            raise RuntimeError("this layer cannot be captured")

        return broken

    steps = [[b] for b in _batches(4)]
    want = _train(_model(checkpoint, graphs=False, dropout=0.2)[0], steps, _to_none)
    monkeypatch.setattr(recompute_graphs, "_backward_function", failing)
    model, _ = _model(checkpoint, graphs=True, dropout=0.2)
    with caplog.at_level("WARNING", logger="qlora_plugin"):
        got = _train(model, steps, _to_none)
    controller = _controller(model)
    assert controller.captured is None and controller.replays == 0
    assert "capture failed: RuntimeError: this layer cannot be captured" in controller.disabled_because
    warnings = [r.getMessage() for r in caplog.records if "CUDA graphs off" in r.getMessage()]
    assert len(warnings) == 1 and "the recomputed layers" in warnings[0], warnings
    _assert_same(got, want, tol=1e-6)
