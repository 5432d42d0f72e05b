"""Copies of GPU tensors in pinned host memory, made and brought back on a side stream.

Offloaded recompute parks each layer's input on the host during forward
(:mod:`qlora_plugin.fastpath.kernels.recompute`), and parked MLP outputs go the same way
(:mod:`qlora_plugin.fastpath.kernels.kept_outputs`). Both copy in pieces of at most
:data:`HOST_PIECE_BYTES` on a stream of their own, so the copies overlap the layers' compute,
and the consumer's stream waits only for the copy it needs. A tensor not on a CUDA device is
copied at once (the CPU tests run the same bookkeeping).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora_plugin.fastpath.stash_plan import HOST_PIECE_BYTES


@dataclass
class HostCopy:
    """A tensor's bytes on the host (``pieces``), its shape and dtype (``like``, on the meta device),
    the device it came from, and the event after which the pieces are complete (None: complete already)."""

    pieces: list[torch.Tensor]
    like: torch.Tensor
    device: torch.device
    copied: torch.cuda.Event | None


def to_host(tensor: torch.Tensor, stream: torch.cuda.Stream | None, piece_bytes: int = HOST_PIECE_BYTES) -> HostCopy:
    """Start copying ``tensor`` to pinned host memory on ``stream`` after the work queued so far.

    ``tensor`` must not change before the copy is done; its storage stays allocated until then.
    """
    flat = tensor.detach().reshape(-1)
    step = max(piece_bytes // max(tensor.element_size(), 1), 1)
    like = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    if stream is None or not tensor.is_cuda:
        return HostCopy([flat[s : s + step].clone() for s in range(0, flat.numel(), step)], like, tensor.device, None)
    pieces = []
    stream.wait_stream(torch.cuda.current_stream(tensor.device))
    with torch.cuda.stream(stream):
        for start in range(0, flat.numel(), step):
            source = flat[start : start + step]
            host = torch.empty(source.numel(), dtype=tensor.dtype, device="cpu", pin_memory=True)
            host.copy_(source, non_blocking=True)
            pieces.append(host)
        copied = torch.cuda.Event()
        copied.record(stream)
    flat.record_stream(stream)  # the storage (or its contiguous copy) stays until the copies are done
    return HostCopy(pieces, like, tensor.device, copied)


def to_device(
    copy: HostCopy, device: torch.device, stream: torch.cuda.Stream | None
) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start bringing ``copy`` back to ``device`` on ``stream``; returns the tensor and its ready event.

    The tensor may be read only after :func:`wait_for` (the consumer's stream waits on the event).
    """
    if stream is None or device.type != "cuda":
        return torch.cat(copy.pieces).view(copy.like.shape).to(device), None
    if copy.copied is not None:
        stream.wait_event(copy.copied)
    with torch.cuda.stream(stream):
        dev = torch.empty_like(copy.like, device=device)
        flat, start = dev.view(-1), 0
        for host in copy.pieces:
            flat[start : start + host.numel()].copy_(host, non_blocking=True)
            start += host.numel()
        ready = torch.cuda.Event()
        ready.record(stream)
    return dev, ready


def wait_for(tensor: torch.Tensor, ready: torch.cuda.Event | None) -> torch.Tensor:
    """``tensor`` (from :func:`to_device`), once the current stream has waited for it to arrive."""
    if ready is not None:
        current = torch.cuda.current_stream(tensor.device)
        current.wait_event(ready)
        tensor.record_stream(current)
    return tensor
