#!/usr/bin/env python3
"""How many bytes a step can park in pinned host memory without slowing the GEMMs (issue 22, item 1).

    python benchmarks/host_link_probe.py --out DIR [--gib 4] [--piece-mib 64]

Selective recomputation can keep more per layer than the GPU holds if what is kept travels to
pinned host memory during forward and back during backward, as offload mode already does for
layer inputs. Whether that is free depends on two numbers this probe measures on the device:

- the host link's bandwidth alone, device to host and host to device, in pieces of the size the
  offload stash uses (64 MiB);
- the same copies on a side stream while the default stream runs the 8B shape's gate/up GEMM
  (8,192 x 4,096 by 4,096 x 14,336, bf16) back to back: the copy rate then, and how much the GEMMs
  slow down beside it.

Writes ``host_link.json`` in ``--out``. Needs CUDA; nothing is written without it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

MIB = 1024**2
GIB = 1024**3


def _enqueue_copies(
    pieces_gpu: list[torch.Tensor], pieces_host: list[torch.Tensor], to_host: bool, stream: torch.cuda.Stream
) -> tuple[torch.cuda.Event, torch.cuda.Event]:
    """Queue one pass over all pieces on ``stream``; returns its (start, end) events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record(stream)
        for gpu, host in zip(pieces_gpu, pieces_host, strict=True):
            (host if to_host else gpu).copy_(gpu if to_host else host, non_blocking=True)
        end.record(stream)
    return start, end


def _copy_rate(
    pieces_gpu: list[torch.Tensor], pieces_host: list[torch.Tensor], to_host: bool, stream: torch.cuda.Stream
) -> float:
    """GB/s of one pass over all pieces on ``stream`` alone."""
    start, end = _enqueue_copies(pieces_gpu, pieces_host, to_host, stream)
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000
    return sum(p.numel() * p.element_size() for p in pieces_gpu) / seconds / 1e9


def _gemm_tflops(x: torch.Tensor, w: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(TFLOP/s, seconds) of ``repeats`` GEMMs x @ w on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        torch.mm(x, w)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000
    return 2 * x.shape[0] * x.shape[1] * w.shape[1] * repeats / seconds / 1e12, seconds


def probe(total_gib: float, piece_mib: int) -> dict[str, object]:
    """The figures described in the module docstring, as one JSON-ready dict."""
    device = torch.device("cuda")
    count = max(int(total_gib * GIB // (piece_mib * MIB)), 1)
    elements = piece_mib * MIB // 2
    pieces_gpu = [torch.empty(elements, dtype=torch.bfloat16, device=device).normal_() for _ in range(count)]
    pieces_host = [torch.empty(elements, dtype=torch.bfloat16, pin_memory=True) for _ in range(count)]
    side = torch.cuda.Stream(device)
    x = torch.randn(8192, 4096, dtype=torch.bfloat16, device=device)
    w = torch.randn(4096, 14336, dtype=torch.bfloat16, device=device)
    for _ in range(2):  # warm-up: cuBLAS heuristics, first-touch of the pinned pages
        _copy_rate(pieces_gpu, pieces_host, True, side)
        _copy_rate(pieces_gpu, pieces_host, False, side)
        _gemm_tflops(x, w, 10)
    d2h_alone = _copy_rate(pieces_gpu, pieces_host, True, side)
    h2d_alone = _copy_rate(pieces_gpu, pieces_host, False, side)
    gemm_alone, gemm_s = _gemm_tflops(x, w, 50)
    repeats = max(int(50 * (total_gib * GIB / (d2h_alone * 1e9)) / gemm_s), 50)
    beside: dict[str, float] = {}
    for name, to_host in (("d2h", True), ("h2d", False)):
        torch.cuda.synchronize()
        copy_start, copy_end = _enqueue_copies(pieces_gpu, pieces_host, to_host, side)
        tflops, _ = _gemm_tflops(x, w, repeats)
        copy_end.synchronize()
        copy_s = copy_start.elapsed_time(copy_end) / 1000
        beside[f"{name}_gb_s_beside_gemm"] = round(count * piece_mib * MIB / copy_s / 1e9, 2)
        beside[f"gemm_tflops_beside_{name}"] = round(tflops, 1)
    return {
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "piece_mib": piece_mib,
        "total_gib": round(count * piece_mib * MIB / GIB, 2),
        "d2h_gb_s_alone": round(d2h_alone, 2),
        "h2d_gb_s_alone": round(h2d_alone, 2),
        "gemm_tflops_alone": round(gemm_alone, 1),
        "gemm_shape": [8192, 4096, 14336],
        **beside,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gib", type=float, default=4.0, help="bytes moved per pass")
    parser.add_argument("--piece-mib", type=int, default=64, help="size of one copy (offload's piece)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("host_link_probe: needs a CUDA device; nothing measured", file=sys.stderr)
        return 2
    result = probe(args.gib, args.piece_mib)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_link.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
