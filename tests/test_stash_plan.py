"""How offloaded recompute splits a step's layer inputs between pinned host memory and the GPU.

Pure arithmetic, checked over a grid of machines and steps: everything that fits goes to the host,
the rest stays on the GPU, and a step that fits neither side is refused with one line naming both
sides and the fix. The CUDA suite (tests/test_kernels_cuda.py) checks the split in training.
"""

from __future__ import annotations

import itertools

import pytest

from qlora_plugin.fastpath.stash_plan import (
    GIB,
    GPU_RESERVE,
    GPU_WORKING_INPUTS,
    HOST_RESERVE_FRACTION,
    HOST_RESERVE_MIN,
    StashTooLarge,
    host_bytes,
    host_memory,
    plan_stash,
)

PIECE = 64 * 1024**2
MiB = 1024**2


@pytest.mark.parametrize("size", [1, 1000, PIECE - 1, PIECE, PIECE + 1, 3 * PIECE + 5 * MiB, 40 * PIECE])
def test_host_bytes_round_only_the_last_piece_to_a_power_of_two(size):
    got = host_bytes(size, PIECE)
    assert size <= got < size + PIECE
    tail = got % PIECE
    assert tail == 0 or tail & (tail - 1) == 0


LAYERS = (1, 16, 32, 80)
PER_LAYER = (8 * MiB, 64 * MiB, 3.3 * GIB)
HOST = (8 * GIB, 64 * GIB, 128 * GIB, 512 * GIB)
GPU = (2 * GIB, 40 * GIB, 80 * GIB)


@pytest.mark.parametrize(
    "layers, per_layer, host_total, gpu_free", list(itertools.product(LAYERS, PER_LAYER, HOST, GPU))
)
def test_every_input_goes_somewhere_the_host_first_and_a_refusal_only_when_neither_fits(
    layers, per_layer, host_total, gpu_free
):
    per_layer = int(per_layer)
    available = int(host_total * 0.8)
    room = max(available - max(HOST_RESERVE_MIN, int(HOST_RESERVE_FRACTION * host_total)), 0)
    gpu_room = max(gpu_free - GPU_RESERVE - GPU_WORKING_INPUTS * per_layer, 0)
    on_host_max = min(layers, room // host_bytes(per_layer, PIECE))
    kwargs = dict(host_available=available, host_total=host_total, gpu_free=gpu_free, piece_bytes=PIECE)
    if (layers - on_host_max) * per_layer > gpu_room:
        with pytest.raises(StashTooLarge) as refused:
            plan_stash(layers, per_layer, tokens=per_layer // 8192, **kwargs)
        line = str(refused.value)
        assert "\n" not in line and "gradient_checkpointing='offload'" in line
        assert "shorten max_length" in line and f"{layers} layer inputs" in line
        return
    plan = plan_stash(layers, per_layer, **kwargs)
    assert plan.on_gpu + plan.on_host == layers
    assert plan.on_host == on_host_max  # as many as the host has room for, no more
    assert plan.on_gpu * per_layer <= gpu_room
    assert [plan.keeps_on_gpu(i) for i in range(layers)] == [i < plan.on_gpu for i in range(layers)]


def test_pinned_memory_held_from_earlier_steps_counts_as_room():
    kwargs = dict(host_total=128 * GIB, gpu_free=80 * GIB, piece_bytes=PIECE)
    first = plan_stash(32, 2 * GIB, host_available=100 * GIB, **kwargs)
    assert first.on_gpu == 0
    # the next step: the stash's own 64 GiB of pinned pieces are no longer "available", yet reusable
    again = plan_stash(32, 2 * GIB, host_available=36 * GIB, host_held=64 * GIB, **kwargs)
    assert again.on_gpu == 0


def test_the_refusal_says_how_long_a_step_fits():
    with pytest.raises(StashTooLarge, match=r"about [\d,]+ tokens a step fit here"):
        plan_stash(
            32,
            4 * GIB,
            host_available=20 * GIB,
            host_total=32 * GIB,
            gpu_free=40 * GIB,
            piece_bytes=PIECE,
            tokens=500_000,
        )


def test_host_memory_reads_this_machine():
    available, total = host_memory()
    assert 0 < available <= total
