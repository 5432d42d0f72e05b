"""CUDA graphs over the recomputed decoder layers (recompute ``"full"``, the README snippet's mode).

At the 1B shape a step is bound by the host thread: launching a layer's kernels takes about as
long as running them, three times a step under recompute (forward, recompute, backward). This
module replays each checkpointed layer as two CUDA graphs instead: its forward without an
autograd graph (``forward[i]``) and its recompute together with its backward
(``backward[i]``), so a layer costs the host two replays.

Every graph reads and writes buffers made before the capture, outside the graphs' memory pool:
``inputs[0]`` (layer 0's input, copied in), ``outputs[i]`` (layer i's output, which is layer
i+1's input and what its backward recomputes from: the same tensors the plugin's own recompute
keeps), two gradient buffers that the backward graphs take turns reading and writing (layer i
reads the gradient of its output from ``grads[(i + 1) % 2]`` and writes the gradient of its
input to ``grads[i % 2]``), and one buffer per trainable parameter that the backward graphs add
the parameter's gradient to (bound as ``param.grad`` before a replay: zeroed when the trainer set
the gradient to None, loaded from it when it is another tensor). The graphs share one pool,
captured in the order they are replayed (forwards 0..n-1, backwards n-1..0), so the pool holds one
layer's working memory, not n.

The recompute must draw the forward's dropout masks: the CUDA generator's state before
``forward[i]``'s replay is put back for ``backward[i]``'s, whose forward part draws the same
numbers in the same order (a capture's draws are offsets from the generator's state at replay).

When it replays: a training forward with gradients, on the layers' device, whose layer-0 input
has the shape, dtype and autocast of the capture, and nothing a graph cannot hold (the
conditions of :func:`graphs.why_eager`: no attention mask, no cache, no packed rows, no tiled
MLP, no tensor arguments besides the neutral ones), no hooks on the layers or their parameters,
and each layer's input the previous layer's output. The capture happens at the second
consecutive forward of one shape. A forward of another shape runs eagerly and keeps the graphs (an
epoch's last, shorter batch); :data:`OTHER_SHAPES_BEFORE_DROP` such forwards in a row drop them for
good. Anything else runs the layer through the plugin's own recompute.
On a CPU the same buffers and order serve with each "replay" running the captured function again
(what the tests check the bookkeeping with).
"""

from __future__ import annotations

import functools
import gc
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qlora_plugin.fastpath.kernels.graphs import (
    LayerCall,
    PendingBackward,
    capture_failure,
    global_hooks,
    has_hooks,
    why_eager,
)

_Replay = Callable[[], None]
# A batch of another shape runs eagerly and keeps the graphs (the last, shorter batch of an epoch);
# this many in a row drop them (lengths that vary: the graphs' buffers would only cost memory).
OTHER_SHAPES_BEFORE_DROP = 8


def _parameter_hooks(layers: list[nn.Module]) -> bool:
    """Whether a trainable parameter has a gradient hook, which a gradient added inside a graph skips."""
    for layer in layers:
        for p in layer.parameters():
            if p.requires_grad and (p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None)):
                return True
    return False


def _random_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_random_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _autocast_state(device: torch.device) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


@dataclass
class _Captured:
    """The buffers and graphs of one capture (see the module's docstring)."""

    key: tuple[Any, ...]
    inputs0: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    outputs: list[torch.Tensor]
    grads: tuple[torch.Tensor, torch.Tensor]
    params: list[list[torch.Tensor]]
    sums: list[list[torch.Tensor]]
    storage: tuple[int, ...]  # data pointers of every parameter of the layers at the capture
    forward: list[_Replay] = field(default_factory=list)
    backward: list[_Replay] = field(default_factory=list)
    random: list[torch.Tensor | None] = field(default_factory=list)  # per layer, set by its forward replay

    def input_of(self, index: int) -> torch.Tensor:
        return self.inputs0 if index == 0 else self.outputs[index - 1]

    def replay_forward(self, index: int) -> torch.Tensor:
        """Layer ``index``'s forward graph, its input already in place; returns its output buffer."""
        self.random[index] = _random_state(self.inputs0.device)
        self.forward[index]()
        return self.outputs[index].detach()

    def replay_backward(self, index: int, grad: torch.Tensor) -> torch.Tensor:
        """Layer ``index``'s recompute-and-backward graph under its forward's random state; returns the
        gradient of its input (a buffer the next backward replay but one overwrites)."""
        state = self.random[index]
        if state is None:
            raise RuntimeError(
                "qlora fast path: a recomputed layer's backward ran twice for one forward, which its CUDA "
                "graph cannot replay. Set QLORA_CUDA_GRAPHS=0 to train without CUDA graphs."
            )
        incoming = self.grads[(index + 1) % 2]
        if not _same(grad, incoming):
            incoming.copy_(grad)
        _bind_gradients(self.params[index], self.sums[index])
        device = self.inputs0.device
        now = _random_state(device)
        _set_random_state(device, state)
        self.backward[index]()
        _set_random_state(device, now)
        self.random[index] = None
        return self.grads[index % 2].detach()


def _storage(layers: list[nn.Module]) -> tuple[int, ...]:
    return tuple(p.data_ptr() for layer in layers for p in layer.parameters())


class RecomputeGraphs:
    """Captures and replays the recomputed decoder layers of one model (see the module's docstring)."""

    def __init__(self, layers: list[nn.Module], model: nn.Module, adapter_copies: Any = None) -> None:
        self.layers = layers
        self.model = weakref.ref(model)
        self.adapter_copies = adapter_copies
        self.captured: _Captured | None = None
        self.last_key: tuple[Any, ...] | None = None
        self.disabled_because = ""
        self.eager_because = ""
        self.replays = 0  # forwards replayed
        self.other_shapes = 0  # forwards in a row, since the last replay, of another shape than the capture's
        self._replaying = False
        self.pending = PendingBackward()  # layer 0's backward of the last replay
        self._emb: Any = None  # layer 0's position embeddings in the forward being replayed
        # each layer's forward as its last call ran it, without the checkpointing around it
        self.plain_calls: list[Callable[..., Any] | None] = [None] * len(layers)

    # -- the forward of one layer ---------------------------------------------------------------

    def layer(self, index: int, run: Callable[..., Any], hidden: torch.Tensor, rest: tuple[Any, ...]) -> Any:
        """Layer ``index``'s training forward replayed, or None when it must run eagerly."""
        if self.disabled_because or rest:
            return None
        if self.captured is None:  # only a capture reads them
            self.plain_calls[index] = _plain_call(run)
        kwargs = dict(getattr(run, "keywords", {}))
        if index == 0:
            self._replaying = self._start(hidden, kwargs)
        if not self._replaying or global_hooks():
            return None
        captured = self.captured
        assert captured is not None  # replaying: layer 0's call captured or kept the graphs
        if index > 0 and not (
            _same(hidden, captured.input_of(index))
            and _same_embeddings(kwargs.get("position_embeddings"), self._emb)
            and kwargs.get("attention_mask") is None
        ):
            self._replaying = False  # something between the layers: the rest of this forward runs eagerly
            self.eager_because = f"layer {index}'s input is not layer {index - 1}'s output"
            return None
        out = _GraphedLayer.apply(captured, index, hidden)
        if index == 0:
            self.pending.watch(out)
        return out

    def _start(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> bool:
        """At layer 0: whether this forward replays (capturing first where it is the shape's second)."""
        emb: Any = kwargs.get("position_embeddings")  # transformers' (cos, sin), or None
        model = self.model()
        self.eager_because = why_eager(self.layers[0], model, hidden, kwargs.get("attention_mask"), kwargs, emb)
        if not self.eager_because and hidden.device != next(self.layers[0].parameters()).device:
            self.eager_because = "an input on another device than the layers"
        if self.eager_because:
            return False
        cos, sin = emb
        key = (tuple(hidden.shape), hidden.dtype, tuple(cos.shape), cos.dtype, _autocast_state(hidden.device))
        captured = self.captured
        if captured is not None and key != captured.key:
            self.other_shapes += 1
            if self.other_shapes >= OTHER_SHAPES_BEFORE_DROP:
                self.drop(f"{OTHER_SHAPES_BEFORE_DROP} batches in a row of other shapes than the captured one")
            else:
                self.eager_because = "a batch of another shape than the captured one"
            return False
        if captured is not None and self.pending.waiting():
            self.eager_because = "a forward before the previous forward's backward"
            return False
        if captured is None:
            seen_twice, self.last_key = key == self.last_key, key
            if not seen_twice:
                return False
            if has_hooks(nn.ModuleList(self.layers)) or global_hooks() or _parameter_hooks(self.layers):
                self.disabled_because = "hooks on the decoder layers or their parameters"
                return False
            if any(call is None for call in self.plain_calls):
                return False  # a layer not yet seen in a forward: the next forward captures
            self.captured = captured = self._capture(key, hidden, cos, sin)
            if captured is None:
                return False
        elif captured.storage != _storage(self.layers):
            self.drop("parameters moved since the capture")
            return False
        captured.inputs0.copy_(hidden)
        if not _same(cos, captured.cos):
            captured.cos.copy_(cos)
            captured.sin.copy_(sin)
        self._emb = emb
        self.replays += 1
        self.other_shapes = 0
        return True

    # -- capture --------------------------------------------------------------------------------

    def _capture(
        self, key: tuple[Any, ...], hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> _Captured | None:
        n = len(self.layers)
        pairs = zip(self.layers, self.plain_calls, strict=True)
        calls = [LayerCall(layer, call) for layer, call in pairs if call is not None]
        with torch.no_grad():
            captured = _Captured(
                key=key,
                inputs0=hidden.detach().clone(),
                cos=cos.detach().clone(),
                sin=sin.detach().clone(),
                outputs=[torch.empty_like(hidden) for _ in range(n)],
                grads=(torch.zeros_like(hidden), torch.zeros_like(hidden)),
                params=[call.params for call in calls],
                sums=[[torch.zeros_like(p) for p in call.params] for call in calls],
                storage=_storage(self.layers),
                random=[None] * n,
            )
        autocast = _autocast_state(hidden.device)
        saved_copies = None
        if self.adapter_copies is not None:  # a graph must cast the live adapters, not one forward's copies
            saved_copies, self.adapter_copies.copies = self.adapter_copies.copies, {}
        before = _random_state(hidden.device)
        try:
            record = _Recorder(hidden.device)
            for i in range(n):
                captured.forward.append(record(_forward_function(captured, calls[i], i, autocast)))
            for i in reversed(range(n)):
                captured.backward.append(record(_backward_function(captured, calls[i], i, autocast)))
            captured.backward.reverse()
        except Exception as error:  # noqa: BLE001 - any capture failure leaves the plugin's own recompute
            self.disabled_because = capture_failure(error, "the recomputed layers", self.layers, hidden.device)
            _set_random_state(hidden.device, before)  # the training draws what it would have without the try
            return None
        finally:
            if saved_copies is not None:
                self.adapter_copies.copies = saved_copies
        with torch.no_grad():
            for sums in captured.sums:
                torch._foreach_zero_(sums)  # the warm-up runs added to them
        _set_random_state(hidden.device, before)  # the warm-up runs drew numbers the training would not have
        return captured

    def drop(self, reason: str) -> None:
        """Free the graphs and run eagerly from now on."""
        self.captured, self.disabled_because, self._replaying = None, reason, False
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _plain_call(run: Callable[..., Any]) -> Callable[..., Any]:
    """The layer's own forward from what transformers hands the checkpoint function: ``run`` without its
    keyword arguments. transformers 5.17 hands ``Module.__call__`` (its layers checkpoint in
    ``__call__``), later versions the unwrapped ``forward`` with the layer (they checkpoint in a
    wrapped ``forward``, which calling ``layer.forward`` would enter again)."""
    if isinstance(run, functools.partial):
        return functools.partial(run.func, *run.args)
    return run


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` is ``b``'s memory with ``b``'s layout (a replay can then read it in place)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _same_embeddings(emb: Any, first: Any) -> bool:
    return isinstance(emb, tuple) and isinstance(first, tuple) and all(a is b for a, b in zip(emb, first, strict=True))


def _bind_gradients(params: list[torch.Tensor], sums: list[torch.Tensor]) -> None:
    """Make each ``sums[j]`` hold ``params[j].grad`` (zero where it is None) and be it, before a replay adds to it."""
    stale = [(p, s) for p, s in zip(params, sums, strict=True) if p.grad is not s]
    if not stale:
        return
    with torch.no_grad():
        fresh = [s for p, s in stale if p.grad is None]
        if fresh:
            torch._foreach_zero_(fresh)
        for p, s in stale:
            if p.grad is not None:
                s.copy_(p.grad)
            p.grad = s


def _forward_function(captured: _Captured, call: LayerCall, index: int, autocast: tuple[bool, torch.dtype]) -> _Replay:
    device_type = captured.inputs0.device.type

    def forward() -> None:
        with torch.no_grad(), torch.autocast(device_type, dtype=autocast[1], enabled=autocast[0], cache_enabled=False):
            captured.outputs[index].copy_(call(captured.input_of(index), captured.cos, captured.sin))

    return forward


def _backward_function(captured: _Captured, call: LayerCall, index: int, autocast: tuple[bool, torch.dtype]) -> _Replay:
    device_type = captured.inputs0.device.type
    stand_ins = call.stand_ins()

    def backward() -> None:
        with torch.enable_grad():
            hidden = captured.input_of(index).detach().requires_grad_(True)
            with torch.autocast(device_type, dtype=autocast[1], enabled=autocast[0], cache_enabled=False):
                out = call.function(hidden, captured.cos, captured.sin, *stand_ins)
            grads = torch.autograd.grad(out, (hidden, *stand_ins), captured.grads[(index + 1) % 2], allow_unused=True)
        with torch.no_grad():
            captured.grads[index % 2].copy_(grads[0])
            pairs = [(s, g) for s, g in zip(captured.sums[index], grads[1:], strict=True) if g is not None]
            if pairs:
                torch._foreach_add_([s for s, _ in pairs], [g for _, g in pairs])

    return backward


class _Recorder:
    """Turns a function into a replay after one warm-up run: a CUDA graph (one shared pool, captured
    on a side stream), or on a CPU the function itself (so a function that cannot run fails here on
    both)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            gc.collect()
            torch.cuda.empty_cache()
            self.pool = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream(device)

    def __call__(self, function: _Replay) -> _Replay:
        if self.device.type != "cuda":
            function()
            return function
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            function()  # lazy initialisation and autotuning stay out of the capture
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=self.pool)
            try:
                function()
            finally:
                graph.capture_end()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return graph.replay


class _GraphedLayer(torch.autograd.Function):
    """One recomputed layer replayed: its forward graph now, its recompute-and-backward graph in backward."""

    @staticmethod
    def forward(ctx: Any, captured: _Captured, index: int, hidden: torch.Tensor) -> torch.Tensor:
        ctx.captured, ctx.index = captured, index  # held here, so dropped graphs stay until this backward
        return captured.replay_forward(index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, torch.Tensor]:
        return None, None, ctx.captured.replay_backward(ctx.index, grad)
