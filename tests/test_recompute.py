"""The plugin's own recompute (qlora_plugin.fastpath.kernels.recompute): a checkpointed layer whose
forward builds no graph, run again in backward.

It replaces torch's non-reentrant checkpoint in one process, so it must give that checkpoint's loss
and gradients wherever that one serves: with LoRA dropout (the same masks), under autocast (the same
dtypes), with two forwards before one backward; and hand back to torch's checkpoint where it cannot
pass a gradient on (an argument besides the hidden states that wants one, a layer that returns more
than a tensor, router logits read by the loss, several processes).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _tiny_qlora import VOCAB, load_4bit, lora, lora_grads, rel_err, tiny_llama_checkpoint
from architectures import two_layer_model
from torch import nn

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from transformers.modeling_layers import GradientCheckpointingLayer  # noqa: E402

from qlora_plugin.build.context import make_context  # noqa: E402
from qlora_plugin.core.environment import read_knobs  # noqa: E402
from qlora_plugin.core.recipe import qlora_recipe  # noqa: E402
from qlora_plugin.fastpath.kernel_choice import kernel_config  # noqa: E402
from qlora_plugin.fastpath.kernels import FastPathConfig, apply_fast_path, recompute  # noqa: E402
from qlora_plugin.fastpath.kernels.recompute import own_recompute_serves, set_recompute  # noqa: E402

SEQ = 40


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    return tiny_llama_checkpoint(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def torch_checkpoints(monkeypatch) -> list[int]:
    """Counts the calls that reach torch's checkpoint."""
    calls: list[int] = []
    original = recompute.checkpoint

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(recompute, "checkpoint", counted)
    return calls


def _qlora(checkpoint, *, recompute_mode: str, own: bool, dropout: float):
    model = lora(load_4bit(checkpoint), stock=False, dropout=dropout)
    config = FastPathConfig(compute_dtype=torch.float32, recompute=recompute_mode, own_recompute=own)
    report = apply_fast_path(model, config=config)
    assert report.own_recompute == (own and recompute_mode != "none")
    return model.train()


def _step(model, *, seed: int = 3, forwards: int = 1) -> tuple[float, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    torch.manual_seed(seed)
    total = torch.zeros(())
    for _ in range(forwards):
        batch = torch.randint(0, VOCAB // 4, (2, SEQ), generator=g)
        total = total + model(input_ids=batch, labels=batch).loss
    total.backward()
    return float(total.detach()), lora_grads(model)


def _assert_same(got, want, tol: float) -> None:
    assert abs(got[0] - want[0]) <= tol * abs(want[0])
    assert got[1].keys() == want[1].keys() and want[1]
    for key in want[1]:
        assert want[1][key].abs().sum() > 0, key
        assert rel_err(got[1][key], want[1][key]) <= tol, key


@pytest.mark.parametrize("forwards", [1, 2])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_own_recompute_gives_torch_checkpoints_loss_and_gradients(checkpoint, torch_checkpoints, dropout, forwards):
    want = _step(_qlora(checkpoint, recompute_mode="full", own=False, dropout=dropout), forwards=forwards)
    assert len(torch_checkpoints) == 2 * forwards  # two layers a forward
    torch_checkpoints.clear()
    got = _step(_qlora(checkpoint, recompute_mode="full", own=True, dropout=dropout), forwards=forwards)
    assert not torch_checkpoints  # the own function served every layer
    _assert_same(got, want, tol=1e-6)
    if dropout == 0.0:  # and both are the model's gradients without recompute
        plain = _qlora(checkpoint, recompute_mode="none", own=True, dropout=0.0)
        _assert_same(_step(plain, forwards=forwards), want, 1e-5)


def _grads_under_autocast(own: bool) -> dict[str, torch.Tensor]:
    model = two_layer_model()
    set_recompute(model, "full", own=own)
    batch = torch.randint(3, 90, (2, SEQ), generator=torch.Generator().manual_seed(5))  # architectures.py: 96 tokens
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_recompute_runs_under_the_forwards_autocast(torch_checkpoints):
    want = _grads_under_autocast(own=False)
    torch_checkpoints.clear()
    got = _grads_under_autocast(own=True)
    assert not torch_checkpoints
    layer_weights = [k for k in want if ".layers." in k]
    assert layer_weights and got.keys() == want.keys()
    for key in want:
        assert rel_err(got[key], want[key]) <= 1e-5, key


class _Layer(GradientCheckpointingLayer):
    """A decoder-like layer: ``hidden + mlp(hidden) * scale``; returns a tuple where asked."""

    def __init__(self, *, as_tuple: bool) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.as_tuple = as_tuple

    def forward(self, hidden: torch.Tensor, scale: torch.Tensor, **kwargs) -> torch.Tensor | tuple[torch.Tensor]:
        out = hidden + self.mlp(hidden) * scale
        return (out,) if self.as_tuple else out


class _Stack(nn.Module):
    def __init__(self, *, as_tuple: bool) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.layers = nn.ModuleList(_Layer(as_tuple=as_tuple) for _ in range(2))

    def forward(self, hidden: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            out = layer(hidden, scale)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def _stack_grads(
    *, as_tuple: bool, mode: str, scale_wants_grad: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    model = _Stack(as_tuple=as_tuple).train()
    set_recompute(model, mode)
    hidden = torch.randn(3, 16, generator=torch.Generator().manual_seed(4))
    scale = torch.full((16,), 0.7, requires_grad=scale_wants_grad)
    model(hidden, scale).square().sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return grads, None if scale.grad is None else scale.grad.clone()


def test_an_argument_that_wants_a_gradient_goes_to_torchs_checkpoint_and_gets_it(torch_checkpoints):
    want, want_scale = _stack_grads(as_tuple=False, mode="none", scale_wants_grad=True)
    got, got_scale = _stack_grads(as_tuple=False, mode="full", scale_wants_grad=True)
    assert len(torch_checkpoints) == 2
    assert want_scale is not None and got_scale is not None and rel_err(got_scale, want_scale) <= 1e-6
    for key in want:
        assert rel_err(got[key], want[key]) <= 1e-6, key
    torch_checkpoints.clear()  # the same arguments wanting no gradient: the own function serves
    _stack_grads(as_tuple=False, mode="full", scale_wants_grad=False)
    assert not torch_checkpoints


def test_a_layer_returning_a_tuple_goes_to_torchs_checkpoint_from_its_first_call(torch_checkpoints):
    want, _ = _stack_grads(as_tuple=True, mode="none", scale_wants_grad=False)
    model = _Stack(as_tuple=True).train()
    set_recompute(model, "full")
    hidden = torch.randn(3, 16, generator=torch.Generator().manual_seed(4))
    model(hidden, torch.full((16,), 0.7)).square().sum().backward()
    got = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    for key in want:
        assert rel_err(got[key], want[key]) <= 1e-6, key
    assert len(torch_checkpoints) == 2
    assert all(not layer._gradient_checkpointing_func.own for layer in model.layers)


def test_router_logits_read_by_the_loss_keep_torchs_checkpoint():
    model = two_layer_model()
    assert own_recompute_serves(model)
    model.config.output_router_logits = True
    assert not own_recompute_serves(model)


def test_the_knob_turns_the_own_recompute_off(monkeypatch):
    assert read_knobs({}).torch_checkpoint is False
    assert read_knobs({"QLORA_TORCH_CHECKPOINT": "1"}).torch_checkpoint is True
    assert kernel_config(make_context(qlora_recipe()), "cpu").own_recompute is True
    monkeypatch.setenv("QLORA_TORCH_CHECKPOINT", "1")
    assert kernel_config(make_context(qlora_recipe()), "cpu").own_recompute is False


def test_the_fast_path_line_says_which_function_recomputes(checkpoint):
    from qlora_plugin.fastpath.wording import describe

    recipe = qlora_recipe()
    for own in (True, False):
        config = FastPathConfig(compute_dtype=torch.float32, recompute="full", own_recompute=own)
        report = apply_fast_path(lora(load_4bit(checkpoint), stock=False), config=config)
        line = describe(report, config, recipe, "loss", ())
        assert ("by the plugin's own function" in line) is own, line


def _architecture_grads(name: str, *, own: bool | None, dropout: float) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of a two-layer ``name`` model after one step (``own`` None: no recompute)."""
    model = two_layer_model(name, dropout=dropout)
    set_recompute(model, "none" if own is None else "full", own=bool(own))
    batch = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(7))
    torch.manual_seed(1)
    model(input_ids=batch, labels=batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "name", ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gpt_neox", "mixtral", "qwen2_moe"]
)
def test_every_architecture_gets_torch_checkpoints_gradients(name):
    """Each architecture the tests pin down, dropout on where it has one: the same gradients."""
    want = _architecture_grads(name, own=False, dropout=0.2)
    got = _architecture_grads(name, own=True, dropout=0.2)
    assert got.keys() == want.keys() and any(".0." in k for k in want) and any(".1." in k for k in want)
    for key in want:
        assert rel_err(got[key], want[key]) <= 1e-5, key
    plain = _architecture_grads(name, own=None, dropout=0.0)  # and without dropout, recompute's own gradients
    for key, value in _architecture_grads(name, own=True, dropout=0.0).items():
        assert rel_err(value, plain[key]) <= 1e-5, key


def _serves_in_group(rank: int, init: str, answers: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        Path(answers, f"{rank}.txt").write_text(str(own_recompute_serves(two_layer_model())))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_several_processes_keep_torchs_checkpoint(tmp_path):
    """DDP and FSDP hook the graph a layer's forward builds: with two ranks the own function stands aside."""
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_serves_in_group, args=(init, str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"{rank}.txt").read_text() for rank in (0, 1)] == ["False", "False"]
    assert own_recompute_serves(two_layer_model())  # this process, in no group


def test_the_report_says_own_recompute_only_where_it_was_set(checkpoint, monkeypatch):
    """Outside transformers' tested versions the layers keep their own switches: nothing to report."""
    monkeypatch.setattr(recompute, "allowed", lambda name: name != "transformers-checkpointing-layers")
    model = lora(load_4bit(checkpoint), stock=False)
    model.get_base_model().gradient_checkpointing_enable()  # transformers' own switches: torch's checkpoint
    config = FastPathConfig(compute_dtype=torch.float32, recompute="full", own_recompute=True)
    report = apply_fast_path(model, config=config)
    assert report.layers_recomputed == 2 and report.own_recompute is False
