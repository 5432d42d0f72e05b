"""Every ``QLORA_*`` environment variable the package reads, read here and nowhere else.

The run's tuning knobs (:class:`Knobs`) are read when a run context is made
(:func:`qlora_plugin.build.context.make_context`) and by ``qlora estimate``; the last two below
switch a check and a report. Switches take 1 or 0 (also true/false, yes/no, on/off, any case),
counts a whole number >= 0; a knob's value that is neither is reported (``Knobs.problems``, one
line naming the variable and its value) and its default used.

- ``QLORA_FAST_PATH_ON_CPU=1``: the fast path's PyTorch references on a CPU (for tests);
- ``QLORA_CUDA_GRAPHS=0``: no CUDA graphs at all (the speed point's, and the recomputed layers');
- ``QLORA_RECOMPUTE_GRAPHS=1``: CUDA graphs over the recomputed layers (recompute "full"; off until measured on a GPU);
- ``QLORA_PACKED_ATTENTION=0``: packed rows left to transformers' masked attention;
- ``QLORA_TILED_MLP=N``: a step's MLPs run tiled from N tokens (0: never);
- ``QLORA_OFFLOAD_KEEP_LAYERS=K``: under offloaded recompute the first K layer inputs stay on the GPU;
- ``QLORA_KEEP_MLP_LAYERS=K``: under recompute K layers (after the parked ones) keep their MLP's gate and up outputs;
- ``QLORA_PARK_MLP_LAYERS=P``: under recompute P more layers (the first ones) keep them in pinned host memory;
- ``QLORA_TORCH_CHECKPOINT=1``: recompute through torch's non-reentrant checkpoint, not the plugin's own function;
- ``QLORA_UNTESTED_PATCHES=1``: patches outside their tested versions are used anyway, with a warning;
- ``QLORA_TRACEBACK=1``: a failed ``qlora`` command or Axolotl run shows the traceback too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

FAST_PATH_ON_CPU = "QLORA_FAST_PATH_ON_CPU"
CUDA_GRAPHS = "QLORA_CUDA_GRAPHS"
RECOMPUTE_GRAPHS = "QLORA_RECOMPUTE_GRAPHS"
PACKED_ATTENTION = "QLORA_PACKED_ATTENTION"
TILED_MLP = "QLORA_TILED_MLP"
OFFLOAD_KEEP_LAYERS = "QLORA_OFFLOAD_KEEP_LAYERS"
KEEP_MLP_LAYERS = "QLORA_KEEP_MLP_LAYERS"
PARK_MLP_LAYERS = "QLORA_PARK_MLP_LAYERS"
TORCH_CHECKPOINT = "QLORA_TORCH_CHECKPOINT"
UNTESTED_PATCHES = "QLORA_UNTESTED_PATCHES"
TRACEBACK = "QLORA_TRACEBACK"


@dataclass(frozen=True)
class Knobs:
    """The run's tuning knobs as the environment sets them (defaults where it does not).

    ``problems``: one line per value that could not be read (its default is used instead).
    """

    fast_path_on_cpu: bool = False
    cuda_graphs: bool = True
    recompute_graphs: bool = False
    packed_attention: bool = True
    tiled_mlp_min_tokens: int | None = None  # None: the kernels' own threshold
    offload_keep_layers: int = 0
    keep_mlp_layers: int = 0
    park_mlp_layers: int = 0
    torch_checkpoint: bool = False
    problems: tuple[str, ...] = ()


def read_knobs(environ: Mapping[str, str] | None = None) -> Knobs:
    """The knobs ``environ`` (default: this process's environment) sets."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    tiled = _count(environ, TILED_MLP, "the MLPs tile from that many tokens (0: never)", problems)
    keep = _count(environ, OFFLOAD_KEEP_LAYERS, "the first that many layers keep their inputs on the GPU", problems)
    keep_mlp = _count(
        environ, KEEP_MLP_LAYERS, "that many layers keep their MLP's gate and up outputs on the GPU", problems
    )
    park_mlp = _count(
        environ, PARK_MLP_LAYERS, "that many more layers keep their MLP's gate and up outputs in host memory", problems
    )
    return Knobs(
        fast_path_on_cpu=_switch(environ, FAST_PATH_ON_CPU, False, "the fast path's references on a CPU", problems),
        cuda_graphs=_switch(environ, CUDA_GRAPHS, True, "CUDA graphs", problems),
        recompute_graphs=_switch(environ, RECOMPUTE_GRAPHS, False, "CUDA graphs over the recomputed layers", problems),
        packed_attention=_switch(environ, PACKED_ATTENTION, True, "packed rows attended per sequence", problems),
        tiled_mlp_min_tokens=tiled,
        offload_keep_layers=keep or 0,
        keep_mlp_layers=keep_mlp or 0,
        park_mlp_layers=park_mlp or 0,
        torch_checkpoint=_switch(environ, TORCH_CHECKPOINT, False, "torch's checkpoint for the recompute", problems),
        problems=tuple(problems),
    )


ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")


def untested_patches_allowed() -> bool:
    """True when ``QLORA_UNTESTED_PATCHES=1`` (or true, yes, on) lets patches run outside their tested versions."""
    return os.environ.get(UNTESTED_PATCHES, "").strip().lower() in ON


def show_traceback() -> bool:
    """True when ``QLORA_TRACEBACK`` asks for the traceback of a failed command or run (any value but 0,
    false, no or off)."""
    value = os.environ.get(TRACEBACK, "").strip().lower()
    return bool(value) and value not in OFF


def _switch(environ: Mapping[str, str], name: str, default: bool, meaning: str, problems: list[str]) -> bool:
    """On or off from ``name`` (1/0, true/false, yes/no, on/off, any case); ``default`` where unset, or
    where unreadable (a line in ``problems``)."""
    value = environ.get(name, "").strip()
    if not value:
        return default
    if value.lower() in ON:
        return True
    if value.lower() in OFF:
        return False
    state = "on" if default else "off"
    problems.append(f"{name}={value!r} is not 1 or 0 ({meaning}); using the default ({state})")
    return default


def _count(environ: Mapping[str, str], name: str, meaning: str, problems: list[str]) -> int | None:
    """A whole number >= 0 from ``name``, or None where it is unset or unreadable (a line in ``problems``)."""
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        problems.append(f"{name}={value!r} is not a whole number >= 0 ({meaning}); using the default")
        return None
    return count
