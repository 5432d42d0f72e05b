"""What the decoder layers keep for backward: everything, only their inputs, or their
inputs parked in pinned CPU memory.

``set_recompute(model, "none" | "full" | "offload", every=1)`` drives transformers'
``GradientCheckpointingLayer`` switches directly:
* ``none``: no recompute (fastest; activations of every layer stay on the GPU);
* ``full``: every ``every``-th layer keeps only its input and is recomputed in backward; in one
  process through the plugin's own function, whose forward builds no autograd graph (lighter on
  the host thread than torch's non-reentrant checkpoint, which serves otherwise);
* ``offload``: like ``full``, but each kept input is copied to pinned host memory on a
  side stream during forward (in pieces of at most :data:`HOST_PIECE_BYTES`) and brought
  back, one layer ahead, during backward. Where the host has no room for a step's inputs,
  the first layers keep theirs on the GPU, split at each step's first layer from the memory
  free on both sides (:mod:`qlora_plugin.fastpath.stash_plan`); a step that fits
  neither side stops before its first layer runs, with one line saying so.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora_plugin.core.patches import allowed
from qlora_plugin.fastpath.kernels.graphs import text_decoder_layers
from qlora_plugin.fastpath.kernels.host_copies import HostCopy, to_device, to_host, wait_for
from qlora_plugin.fastpath.kernels.kept_outputs import ParkingLot, fresh_contexts, keep_mlp_outputs, new_store
from qlora_plugin.fastpath.kernels.recompute_graphs import RecomputeGraphs
from qlora_plugin.fastpath.stash_plan import HOST_PIECE_BYTES, StashPlan, host_memory, plan_stash

_log = logging.getLogger("qlora_plugin")

MODES = ("none", "full", "offload")


class _HostStash:
    """Pinned-host copies of layer inputs, with one-ahead prefetch in backward."""

    def __init__(self, device: torch.device, layers: int) -> None:
        self.stream = torch.cuda.Stream(device)
        self.entries: dict[int, HostCopy] = {}
        self.prefetched: dict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = {}
        self.next_id = 0
        self.layers = layers  # offloaded layers per step
        self.plan: StashPlan | None = None
        self.host_held = 0  # pinned bytes the host allocator keeps for this stash from earlier steps
        self.reported: set[int] = set()

    def keeps_on_gpu(self, index: int, hidden: torch.Tensor) -> bool:
        """Whether the ``index``-th offloaded layer of this step keeps its input on the GPU; planned at index 0."""
        if index == 0 or self.plan is None:
            self.plan = self._plan(hidden)
        return self.plan.keeps_on_gpu(index)

    def _plan(self, hidden: torch.Tensor) -> StashPlan:
        available, total = host_memory()
        free, _ = torch.cuda.mem_get_info(hidden.device)
        cached = torch.cuda.memory_reserved(hidden.device) - torch.cuda.memory_allocated(hidden.device)
        plan = plan_stash(
            self.layers,
            hidden.numel() * hidden.element_size(),
            host_available=available,
            host_total=total,
            gpu_free=free + cached,
            piece_bytes=HOST_PIECE_BYTES,
            host_held=self.host_held,
            tokens=hidden.shape[:-1].numel(),
        )
        self.host_held = max(self.host_held, plan.on_host * plan.bytes_per_layer)
        if plan.on_gpu and plan.on_gpu not in self.reported:
            self.reported.add(plan.on_gpu)
            _log.info(
                "qlora offload: a step of %s tokens keeps the first %d of %d layer inputs on the GPU "
                "(%.2f GiB each; pinned host memory has room for the other %d)",
                f"{hidden.shape[:-1].numel():,}",
                plan.on_gpu,
                self.layers,
                plan.bytes_per_layer / 1024**3,
                plan.on_host,
            )
        return plan

    def reset(self) -> None:
        self.next_id = 0

    def put(self, t: torch.Tensor) -> int:
        key, self.next_id = self.next_id, self.next_id + 1
        self.entries[key] = to_host(t, self.stream, HOST_PIECE_BYTES)
        return key

    def take(self, key: int, device: torch.device) -> torch.Tensor:
        if key in self.prefetched:
            dev, ready = self.prefetched.pop(key)
        else:
            dev, ready = to_device(self.entries.pop(key), device, self.stream)
        if key - 1 in self.entries:  # layers run backward in reverse order
            self.prefetched[key - 1] = to_device(self.entries.pop(key - 1), device, self.stream)
        if key == 0:
            self.reset()
        return wait_for(dev, ready)


class _NotATensor(TypeError):
    """A layer returned something other than one tensor, which :class:`_RecomputedLayer` cannot pass on."""


@dataclass(frozen=True)
class _ForwardState:
    """What a layer's forward ran under that its recompute must run under too: the random streams
    (LoRA dropout draws the same masks) and autocast (the same ops run in the same dtypes)."""

    device: torch.device
    cpu_rng: torch.Tensor
    device_rng: torch.Tensor | None
    autocast: tuple[tuple[str, bool, torch.dtype], ...]
    autocast_cache: bool

    @classmethod
    def capture(cls, device: torch.device) -> _ForwardState:
        kinds = sorted({device.type, "cpu"})
        return cls(
            device=device,
            cpu_rng=torch.get_rng_state(),
            device_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            autocast=tuple((kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) for kind in kinds),
            autocast_cache=torch.is_autocast_cache_enabled(),
        )

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        devices = [self.device] if self.device_rng is not None else []
        with torch.random.fork_rng(devices=devices), contextlib.ExitStack() as autocasts:
            torch.set_rng_state(self.cpu_rng)
            if self.device_rng is not None:
                torch.cuda.set_rng_state(self.device_rng, self.device)
            for kind, enabled, dtype in self.autocast:
                autocasts.enter_context(
                    torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=self.autocast_cache)
                )
            yield


class _RecomputedLayer(torch.autograd.Function):
    """A checkpointed decoder layer: its forward runs without an autograd graph, and again with one
    in backward, from its input kept on the device (``stash`` None) or parked in pinned host memory.

    torch's non-reentrant checkpoint builds the forward's graph and drops what it saves through
    hooks, one call per saved tensor; skipping both is what makes this cheaper on the host thread.
    """

    @staticmethod
    def forward(
        ctx: Any,
        run: Callable[[torch.Tensor], torch.Tensor],
        stash: _HostStash | None,
        keeps: bool,
        lot: ParkingLot | None,
        hidden: torch.Tensor,
    ) -> torch.Tensor:
        kept = new_store(lot) if keeps else None
        ctx.run, ctx.stash, ctx.kept, ctx.device = run, stash, kept, hidden.device
        if stash is None:
            ctx.save_for_backward(hidden)
        else:
            ctx.key = stash.put(hidden.detach())
        ctx.state = _ForwardState.capture(hidden.device)
        with torch.no_grad(), kept.keeping() if kept is not None else contextlib.nullcontext():
            out = run(hidden)
        if not isinstance(out, torch.Tensor):
            raise _NotATensor(f"recompute without a graph needs layers that return a tensor, not {type(out).__name__}")
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None, None, torch.Tensor]:
        saved = ctx.saved_tensors[0] if ctx.stash is None else ctx.stash.take(ctx.key, ctx.device)
        hidden = saved.detach().requires_grad_(True)
        reusing = ctx.kept.reusing() if ctx.kept is not None else contextlib.nullcontext()
        with ctx.state.restored(), torch.enable_grad(), reusing:
            out = ctx.run(hidden)
        torch.autograd.backward(out, grad)
        return None, None, None, None, hidden.grad


def _checkpoint(keeps: bool, lot: ParkingLot | None, run: Callable[..., Any], hidden: torch.Tensor, *rest: Any) -> Any:
    """torch's non-reentrant checkpoint; with ``keeps``, the layer's MLP keeps its gate and up outputs
    (parked through ``lot`` where marked so)."""
    if not (keeps and torch.is_grad_enabled()):
        return checkpoint(run, hidden, *rest, use_reentrant=False)
    contexts = functools.partial(fresh_contexts, lot)
    return checkpoint(run, hidden, *rest, use_reentrant=False, context_fn=contexts)


def _needs_graph(run: Callable[..., Any], rest: tuple[Any, ...]) -> bool:
    """Whether an argument besides the hidden states wants a gradient (positional or bound to ``run``,
    in a tuple or list too): those only torch's checkpoint passes one back to."""
    keywords = run.keywords.values() if isinstance(run, functools.partial) else ()
    for value in (*rest, *keywords):
        items = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(item, torch.Tensor) and item.requires_grad for item in items):
            return True
    return False


class _LayerCheckpoint:
    """What one checkpointed decoder layer runs in training in place of its forward (transformers
    calls it with the layer's bound forward and positional arguments).

    ``own``: recompute through :class:`_RecomputedLayer` where it can (else torch's checkpoint);
    ``stash``/``index``: offloaded recompute, this layer being the ``index``-th offloaded one of a step;
    ``graphs``/``position``: replay the layer, the ``position``-th of the decoder, as CUDA graphs where
    a forward allows it (:mod:`qlora_plugin.fastpath.kernels.recompute_graphs`).
    """

    def __init__(
        self,
        keeps: bool,
        lot: ParkingLot | None,
        *,
        own: bool,
        stash: _HostStash | None = None,
        index: int = 0,
        graphs: RecomputeGraphs | None = None,
        position: int = 0,
    ) -> None:
        self.keeps, self.lot, self.own, self.stash, self.index = keeps, lot, own, stash, index
        self.graphs, self.position = graphs, position

    def __call__(self, run: Callable[..., Any], hidden: torch.Tensor, *rest: Any) -> Any:
        if not torch.is_grad_enabled():
            return run(hidden, *rest)
        offloaded = self.stash is not None and not self.stash.keeps_on_gpu(self.index, hidden)
        if not (offloaded or self.own) or _needs_graph(run, rest):
            return _checkpoint(self.keeps, self.lot, run, hidden, *rest)
        fn = run if not rest else (lambda h: run(h, *rest))
        if not hidden.requires_grad:  # e.g. the first layer under a frozen embedding: stay on the graph
            hidden = hidden.detach().requires_grad_(True)
        stash = self.stash if offloaded else None
        if self.graphs is not None and stash is None and not self.keeps:
            replayed = self.graphs.layer(self.position, run, hidden, rest)
            if replayed is not None:
                return replayed
        try:
            return _RecomputedLayer.apply(fn, stash, self.keeps, self.lot, hidden)
        except _NotATensor:
            if offloaded:
                raise
            self.own = False  # this layer's outputs are not one tensor: torch's checkpoint from now on
            return _checkpoint(self.keeps, self.lot, run, hidden, *rest)


def own_recompute_serves(model: nn.Module) -> bool:
    """Whether :class:`_RecomputedLayer` may recompute ``model``'s layers: in one process only (DDP and
    FSDP hook the graph a layer's forward builds), and not where the loss reads what a forward hook
    inside a layer records (router logits for the experts' balancing loss), which a forward without a
    graph would leave without a gradient."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        return False
    return not getattr(getattr(model, "config", None), "output_router_logits", False)


def layers_recomputed_without_graph(model: nn.Module) -> int:
    """How many of ``model``'s checkpointed layers :class:`_RecomputedLayer` serves (not torch's checkpoint)."""
    count = 0
    for layer in decoder_layers(model):
        recompute = getattr(layer, "_gradient_checkpointing_func", None)
        on = getattr(layer, "gradient_checkpointing", False)
        if on and isinstance(recompute, _LayerCheckpoint) and recompute.own:
            count += 1
    return count


def recompute_graphs_for(model: nn.Module, layers: list[nn.Module]) -> RecomputeGraphs | None:
    """The CUDA graphs controller for ``model``'s checkpointed ``layers``, or None where they are not
    exactly its text decoder's loop (a vision tower's blocks too, another layout) or the decoder-layer
    call is outside its tested transformers versions."""
    text = text_decoder_layers(model)
    if text is None or text != layers or not allowed("transformers-decoder-layer-call"):
        return None
    return RecomputeGraphs(layers, model, model.__dict__.get("_qlora_adapter_copies"))


def layers_replayed_as_graphs(model: nn.Module) -> int:
    """How many of ``model``'s checkpointed layers are set to replay as CUDA graphs."""
    return sum(
        1
        for layer in decoder_layers(model)
        if getattr(layer, "gradient_checkpointing", False)
        and isinstance(recompute := getattr(layer, "_gradient_checkpointing_func", None), _LayerCheckpoint)
        and recompute.own
        and recompute.graphs is not None
    )


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks that transformers can checkpoint, in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_recompute(
    model: nn.Module,
    mode: str = "none",
    *,
    every: int = 1,
    keep_on_gpu: int = 0,
    keep_mlp_layers: int = 0,
    park_mlp_layers: int = 0,
    own: bool = True,
    graphs: bool = False,
) -> int:
    """Set what each decoder layer recomputes in backward; returns the layers checkpointed.

    ``mode`` is one of :data:`MODES`; with ``every=k`` only every k-th layer (0, k, 2k,
    ...) is checkpointed and the others keep their activations. With ``offload``, the first
    ``keep_on_gpu`` checkpointed layers keep their inputs on the GPU (as ``full`` does):
    GPU memory spent to spare host memory, which long rows can exhaust; of the others, as
    many as the host has no room for at a step stay on the GPU too (see the module's doc).
    With ``full`` or ``offload``, the first ``keep_mlp_layers`` checkpointed layers keep their
    MLP's gate and up outputs on the GPU for the recompute instead of computing them again
    (:mod:`qlora_plugin.fastpath.kernels.kept_outputs`); ``park_mlp_layers`` more keep them in
    pinned host memory: those come first, the ``keep_mlp_layers`` on the GPU after them.
    With ``own`` (and see :func:`own_recompute_serves`), layers whose inputs stay on the GPU recompute
    through the plugin's own function instead of torch's checkpoint: same gradients, less host work.
    With ``graphs`` too, ``full`` recompute of every layer (``every=1``, nothing kept) of a text decoder
    replays each layer as CUDA graphs once batches keep one shape (see :func:`recompute_graphs_for`).
    """
    if mode not in MODES:
        raise ValueError(f"recompute mode must be one of {MODES}, got {mode!r}")

    layers = decoder_layers(model)
    if not allowed("transformers-checkpointing-layers"):
        return sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers)
    checkpointed_layers = [layer for i, layer in enumerate(layers) if mode != "none" and i % every == 0]
    keep_mlp_outputs(layers, 0)  # marks of an earlier setting go
    keeps = keep_mlp_outputs(checkpointed_layers, keep_mlp_layers + park_mlp_layers, parked=park_mlp_layers)
    lot = ParkingLot() if park_mlp_layers and checkpointed_layers else None
    stash: _HostStash | None = None
    if mode == "offload":
        device = next(p.device for p in model.parameters() if p.is_cuda) if torch.cuda.is_available() else None
        if device is None:
            raise ValueError("offloaded recompute needs the model on a CUDA device")
        checkpointed = sum(1 for i in range(len(layers)) if i % every == 0)
        stash = _HostStash(device, max(checkpointed - keep_on_gpu, 0))
    own = own and own_recompute_serves(model)
    replays = None
    if graphs and own and mode == "full" and every == 1 and not (keep_mlp_layers or park_mlp_layers):
        replays = recompute_graphs_for(model, layers)
    n = 0
    layer: Any  # transformers' GradientCheckpointingLayer: its checkpointing attributes are plain ones
    for i, layer in enumerate(layers):
        on = mode != "none" and i % every == 0
        offloaded = on and stash is not None and n >= keep_on_gpu
        layer.gradient_checkpointing = on
        layer._gradient_checkpointing_func = _LayerCheckpoint(
            on and keeps[n],
            lot,
            own=own,
            stash=stash if offloaded else None,
            index=n - keep_on_gpu,
            graphs=replays,
            position=i,
        )
        n += int(on)
    # The top-level flags transformers also reads (e.g. to drop the KV cache in training).
    m: Any
    for m in model.modules():
        if hasattr(m, "gradient_checkpointing") and m not in layers:
            m.gradient_checkpointing = n > 0
    return n
