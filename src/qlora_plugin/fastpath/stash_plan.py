"""Where offloaded recompute keeps each decoder layer's input: pinned host memory, or the GPU.

Under ``gradient_checkpointing="offload"`` every layer input of a step waits in pinned host
memory until its layer's backward. Long rows can need more than the host has (8B shape: 256
KiB a token, 97.7 GiB at 400,000 tokens). :func:`plan_stash` splits the inputs at the first
layer of each step, from the memory free on both sides at that moment: as many as fit go to
the host, the first layers' stay on the GPU, and a step that fits neither side stops with one
line saying how much each side has and what to change, before any layer has run. Pure
arithmetic here (no torch import: ``qlora estimate`` makes the same split);
:mod:`qlora_plugin.fastpath.kernels.recompute` measures and applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
# Host copies are made of pieces of at most this many bytes. torch's caching host allocator
# rounds every pinned allocation up to a power of two: a 400,000-token layer input of the 8B
# shape (3.3 GB) would take 4 GiB, 128 GiB for 32 layers. In 64 MiB pieces the rounding wastes
# at most 64 MiB a tensor, and the pieces are reused from one step to the next.
HOST_PIECE_BYTES = 64 * 1024**2
# What the host keeps for everything else (the OS, the data loader, the trainer): pinned
# allocations fail well before the last byte is taken.
HOST_RESERVE_FRACTION = 0.10
HOST_RESERVE_MIN = 4 * GIB
# What a layer's backward needs on the GPU beside the kept inputs, in layer inputs: the
# recomputed layer (attention, tiled MLP slices, their gradients) is about 14 layer inputs at
# the Llama shapes (benchmarks/NOTES.md section 11: 115 KB a token against 8 KB of input).
GPU_WORKING_INPUTS = 16
GPU_RESERVE = 1 * GIB


class StashTooLarge(RuntimeError):
    """A step's layer inputs fit neither in pinned host memory nor on the GPU."""


@dataclass(frozen=True)
class StashPlan:
    """How many of a step's offloaded layer inputs stay on the GPU (the first ones) and go to the host."""

    on_gpu: int
    on_host: int
    bytes_per_layer: int

    def keeps_on_gpu(self, index: int) -> bool:
        """Whether the ``index``-th offloaded layer of the step keeps its input on the GPU."""
        return index < self.on_gpu


def host_bytes(bytes_per_layer: int, piece_bytes: int) -> int:
    """Pinned bytes one layer input takes in pieces of ``piece_bytes`` (the allocator rounds each to a power of two)."""
    whole, rest = divmod(bytes_per_layer, piece_bytes)
    return whole * piece_bytes + (1 << (rest - 1).bit_length() if rest else 0)


def plan_stash(
    layers: int,
    bytes_per_layer: int,
    *,
    host_available: int,
    host_total: int,
    gpu_free: int,
    piece_bytes: int,
    host_held: int = 0,
    tokens: int | None = None,
) -> StashPlan:
    """Split ``layers`` offloaded inputs of ``bytes_per_layer`` between the host and the GPU.

    ``host_available``: the host's available memory now; ``host_held``: pinned bytes this
    stash already holds from earlier steps (reused, so available to it); ``gpu_free``: bytes
    the GPU's allocator could still give. Raises :class:`StashTooLarge` when the inputs the
    host cannot take do not fit on the GPU beside one layer's backward.
    """
    if layers <= 0 or bytes_per_layer <= 0:
        return StashPlan(0, max(layers, 0), max(bytes_per_layer, 0))
    per_layer_host = host_bytes(bytes_per_layer, piece_bytes)
    reserve = max(HOST_RESERVE_MIN, int(HOST_RESERVE_FRACTION * host_total))
    host_room = max(host_available + host_held - reserve, 0)
    on_host = min(layers, host_room // per_layer_host)
    on_gpu = layers - on_host
    gpu_room = max(gpu_free - GPU_RESERVE - GPU_WORKING_INPUTS * bytes_per_layer, 0)
    if on_gpu * bytes_per_layer > gpu_room:
        fit_gpu = gpu_room // bytes_per_layer
        step = f"a step of {tokens:,} tokens" if tokens else "this step"
        fits = (on_host + fit_gpu) / layers
        shorter = f" (about {int(tokens * fits):,} tokens a step fit here)" if tokens else ""
        raise StashTooLarge(
            f"qlora: {step} keeps {layers} layer inputs of {bytes_per_layer / GIB:.2f} GiB under "
            f"gradient_checkpointing='offload': pinned host memory has room for {on_host} "
            f"({host_room / GIB:.1f} GiB of {host_available / GIB:.1f} available) and the GPU for {fit_gpu} more "
            f"({gpu_free / GIB:.1f} GiB free, one layer's backward kept aside); shorten max_length or the batch"
            f"{shorter}, or free host memory"
        )
    return StashPlan(on_gpu=on_gpu, on_host=on_host, bytes_per_layer=bytes_per_layer)


def host_memory() -> tuple[int, int]:
    """(available, total) bytes of host memory: Linux's MemAvailable and MemTotal, a cgroup limit if lower."""
    available = total = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
        total = int(fields["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import os

        pages, page = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        available, total = pages * page, os.sysconf("SC_PHYS_PAGES") * page
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file, encoding="ascii") as f:
                limit = f.read().strip()
            with open(usage_file, encoding="ascii") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < total:
            total = int(limit)
            available = min(available, max(int(limit) - usage, 0))
        break
    return available, total
