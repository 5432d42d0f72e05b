"""Selective recompute: a checkpointed decoder layer keeps its MLP's gate and up outputs for backward.

Under gradient checkpointing a layer's backward first runs the layer's forward again. At the
Llama shapes most of that recompute is the MLP's two input projections (gate and up: 54 % of a
layer's multiply-adds at Llama-3.1-8B), each a dequantization of a 4-bit weight and a large GEMM,
whose outputs are the same bits the first forward already had. ``keep_mlp_outputs`` marks the
gate and up projections of the first ``count`` checkpointed decoder layers: during a call's first
forward each of them hands its output to that call's :class:`KeptOutputs`, and during the call's
recompute it takes that output back instead of computing it again. Everything else recomputes as
before (the LoRA down-products and dropout masks too, so the autograd graph and its saved tensors
are the ones a full recompute builds, and the gradients are unchanged).

The cost is memory: ``2 x intermediate_size`` values a token per kept layer (at the 8B shape,
batch 4 x 2,048, 0.44 GiB a layer), held from the layer's forward to its backward. Which layers
keep is the ``QLORA_KEEP_MLP_LAYERS`` knob (benchmarks/NOTES.md, sections 13 and 16, predict the time
saved). An MLP call that runs tiled (long rows, :mod:`tiled_mlp`) keeps nothing: its slices would
hold the whole row's intermediates, which tiling exists to avoid.

Parking (``QLORA_PARK_MLP_LAYERS``): the first layers' outputs can instead wait in pinned host
memory (:mod:`host_copies`, on a side stream of the call's :class:`ParkingLot`), so more layers
skip their gate and up recompute than the GPU could hold. A parked call's outputs are brought
back when its recompute starts; the call before it (forward order, the next one backward runs)
starts bringing its own back at the same moment, so the copy overlaps a layer's backward.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import nn

from qlora_plugin.fastpath.kernels.host_copies import HostCopy, to_device, to_host, wait_for

_KEEPS = "_qlora_keeps_output"
_PARKS = "_qlora_parks_output"
KEPT_PROJECTIONS = ("gate_proj", "up_proj")


class ParkingLot:
    """What the keeping calls of one model share: a side stream per CUDA device for the parked outputs
    to travel on, and the latest store made (each new store remembers the one before it, to bring that
    one back early)."""

    def __init__(self) -> None:
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.latest: weakref.ref[KeptOutputs] | None = None

    def stream(self, device: torch.device) -> torch.cuda.Stream | None:
        """The side stream of ``device`` (None off CUDA: the copies are then made at once)."""
        if device.type != "cuda":
            return None
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]


class KeptOutputs:
    """The outputs one call of a checkpointed layer's marked projections produced, until that call's recompute.

    One store per call (not per layer), so a second forward of the same layer before the first
    one's backward (two losses summed, a no-grad pass in between) never hands its outputs to the
    first one's recompute. The store lives as long as the call's autograd graph holds it.
    """

    def __init__(self, lot: ParkingLot | None = None) -> None:
        self.outputs: dict[int, torch.Tensor] = {}
        self.lot = lot
        self.parked: dict[int, HostCopy] = {}  # on the host
        self.arriving: dict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = {}  # on their way back
        self.previous: weakref.ref[KeptOutputs] | None = None
        if lot is not None:
            self.previous, lot.latest = lot.latest, weakref.ref(self)

    def keep(self, module: nn.Module, output: torch.Tensor) -> None:
        """Hold ``output`` [rows, features] for ``module``: on the host where the module parks, else here."""
        if self.lot is not None and module.__dict__.get(_PARKS):
            self.parked[id(module)] = to_host(output, self.lot.stream(output.device))
        else:
            self.outputs[id(module)] = output

    def bring_back_early(self) -> None:
        """Start bringing the parked outputs back to the GPU (they are waited for when the recompute needs them)."""
        if self.lot is not None:
            for key, copy in self.parked.items():
                self.arriving[key] = to_device(copy, copy.device, self.lot.stream(copy.device))
            self.parked.clear()

    def _bring_back(self) -> None:
        """The parked outputs, back on the GPU for this recompute; the store before this one starts its own."""
        self.bring_back_early()
        for key, (tensor, ready) in self.arriving.items():
            self.outputs[key] = wait_for(tensor, ready)
        self.arriving.clear()
        previous = self.previous() if self.previous is not None else None
        if previous is not None:
            previous.bring_back_early()

    @contextlib.contextmanager
    def _phase(self, reusing: bool) -> Iterator[None]:
        if reusing:
            self._bring_back()
        token = _ACTIVE.set((self, reusing))
        try:
            yield
        finally:
            _ACTIVE.reset(token)
            if reusing:  # a recompute that stopped early leaves nothing behind
                self.outputs.clear()
                self.parked.clear()
                self.arriving.clear()

    def contexts(self) -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]:
        """(first forward, recompute) context managers, as ``torch.utils.checkpoint``'s ``context_fn`` returns."""
        return self._phase(False), self._phase(True)

    def keeping(self) -> contextlib.AbstractContextManager[None]:
        """The first forward of the layer: marked projections hand over their outputs."""
        return self._phase(False)

    def reusing(self) -> contextlib.AbstractContextManager[None]:
        """The layer's recompute: marked projections take their outputs back."""
        return self._phase(True)


def new_store(lot: ParkingLot | None = None) -> KeptOutputs:
    """The store of one checkpointed call (made here only, for torch's checkpoint and the own recompute)."""
    return KeptOutputs(lot)


def fresh_contexts(
    lot: ParkingLot | None = None,
) -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]:
    """A new store's (first forward, recompute) contexts: ``context_fn`` for one checkpoint call."""
    return new_store(lot).contexts()


# The layer whose forward is running now, and whether it is the recompute.
_ACTIVE: ContextVar[tuple[KeptOutputs, bool] | None] = ContextVar("qlora_kept_outputs", default=None)


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Keep and reuse nothing inside (a tiled MLP call)."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def reusable_output(module: nn.Module, rows: int, features: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The output ``module`` kept in its layer's first forward, when the layer is being recomputed now.

    Only a tensor of the expected shape [rows, features] and dtype is returned (and forgotten);
    anything else is None, and the projection computes its output as usual.
    """
    active = _ACTIVE.get()
    if active is None or not active[1] or not module.__dict__.get(_KEEPS):
        return None
    kept = active[0].outputs.pop(id(module), None)
    if kept is None or kept.shape != (rows, features) or kept.dtype != dtype:
        return None
    return kept


def offer_output(module: nn.Module, output: torch.Tensor) -> None:
    """Hand ``module``'s output [..., features] to the running call's store, in a layer's first forward."""
    active = _ACTIVE.get()
    if active is not None and not active[1] and module.__dict__.get(_KEEPS):
        active[0].keep(module, output.detach().view(-1, output.shape[-1]))


def keep_mlp_outputs(layers: list[nn.Module], count: int, parked: int = 0) -> list[bool]:
    """Mark the gate and up projections of the first ``count`` of ``layers``, the first ``parked`` of
    them to park on the host; returns, per layer, whether it keeps.

    Only projections the fast path computes (fused LoRA over 4 bits) look at the marks, and parking
    needs the call's store to have a :class:`ParkingLot`. Marks from an earlier call are removed
    first, so ``count=0`` undoes them.
    """
    keeps = []
    for index, layer in enumerate(layers):
        marked = 0
        for name, module in layer.named_modules():
            module.__dict__.pop(_KEEPS, None)
            module.__dict__.pop(_PARKS, None)
            if index < count and name.rsplit(".", 1)[-1] in KEPT_PROJECTIONS:
                module.__dict__[_KEEPS] = True
                if index < parked:
                    module.__dict__[_PARKS] = True
                marked += 1
        keeps.append(marked > 0)
    return keeps


def layers_keeping_mlp_outputs(model: nn.Module, parked: bool = False) -> int:
    """How many decoder layers of ``model`` keep their MLP's gate and up outputs (with ``parked``:
    keep them on the host; see :func:`keep_mlp_outputs`)."""
    mark = _PARKS if parked else _KEEPS
    return sum(1 for m in model.modules() if m.__dict__.get(mark)) // len(KEPT_PROJECTIONS)
