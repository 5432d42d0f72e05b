"""Timing, memory and profiling of a training step: CUDA events and allocator peaks on a GPU,
perf_counter and zeros on a CPU dry run, so one harness serves both."""

from __future__ import annotations

import platform
import re
import time
from pathlib import Path
from typing import Any

from bench_config import DEVICE


def package_versions() -> dict[str, str]:
    """Versions of Python and the stack a row ran on, recorded with every row."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "liger-kernel", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


def sync() -> None:
    """Wait for the GPU (no-op on a CPU dry run), so that wall-clock time covers queued work."""
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    """Give cached allocator blocks back (GPU only), so the next peak starts clean."""
    import torch

    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def reset_peak() -> None:
    """Start a new peak-memory window (GPU only)."""
    import torch

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_allocated() -> int:
    """Peak bytes allocated since the last reset; 0 on a CPU dry run."""
    import torch

    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0


def gpu_name() -> str:
    """The device a row ran on."""
    import torch

    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"


class Events:
    """Paired timing marks: CUDA events on the GPU, perf_counter on a CPU dry run."""

    def __init__(self) -> None:
        self.pairs: list[Any] = []
        self._open: Any = None

    def start(self) -> None:
        self._open = self._mark()

    def stop(self) -> None:
        if self._open is not None:
            self.pairs.append((self._open, self._mark()))
            self._open = None

    @staticmethod
    def _mark() -> Any:
        import torch

        if DEVICE == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def mean_ms(self, skip: int = 0) -> float:
        pairs = self.pairs[skip:] or self.pairs
        if not pairs:
            return 0.0
        if DEVICE == "cuda":
            return sum(s.elapsed_time(e) for s, e in pairs) / len(pairs)
        return 1e3 * sum(e - s for s, e in pairs) / len(pairs)


def paged_state_bytes(optimizer: Any) -> int:
    """Optimizer-state bytes in CUDA managed memory, outside the allocator's peak.

    The plugin's fused PagedAdamW keeps its moments in one managed buffer and reports its size;
    bitsandbytes' paged optimizers mark each state tensor ``is_paged``.
    """
    paged = optimizer.paged_bytes() if hasattr(optimizer, "paged_bytes") else 0
    return int(paged) + sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if getattr(t, "is_paged", False)
    )


def gib(n: float) -> float:
    """Bytes as GiB, rounded for the result rows."""
    return round(n / 2**30, 2)


_GEMM = re.compile(r"gemm|nvjet|cutlass|xmma|sm90_|cublas", re.I)
_FP32_GEMM = re.compile(r"sgemm|f32f32_f32f32|_sss_|nvjet_sm\d+_sss|gemm_f32", re.I)


def kernel_category(name: str) -> str:
    """The kind of work a CUDA kernel does, from its name (GEMM by dtype, attention, dequant, ...)."""
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n:
        return "attention"
    if "dequant" in n:
        return "nf4 dequant"
    if "adam" in n or "optimizer" in n:
        return "optimizer"
    if "cross_entropy" in n or "liger_cross" in n or "log_softmax" in n or "nll_loss" in n:
        return "loss"
    if "rms" in n:
        return "rmsnorm"
    if "silu" in n or "swiglu" in n:
        return "silu*mul"
    if _GEMM.search(name):
        return "gemm fp32" if _FP32_GEMM.search(name) else "gemm bf16"
    if "memcpy" in n or "copy" in n:
        return "copy/cast"
    if "reduce" in n or "norm" in n:
        return "reduce"
    if "elementwise" in n or "vectorized" in n:
        return "elementwise"
    return "other"


class MatmulFlops:
    """TorchDispatchMode counting matmul FLOPs per input dtype."""

    def __new__(cls) -> Any:
        from torch.utils._python_dispatch import TorchDispatchMode

        class _Mode(TorchDispatchMode):
            def __init__(self) -> None:
                super().__init__()
                self.flops: dict[str, float] = {}

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                kwargs = kwargs or {}
                name = func.__name__.split(".")[0]
                if name in ("mm", "addmm", "bmm", "baddbmm"):
                    a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
                    f = 2.0 * a.numel() * b.shape[-1]
                    key = str(a.dtype).replace("torch.", "")
                    self.flops[key] = self.flops.get(key, 0.0) + f
                return func(*args, **kwargs)

        return _Mode()


def summarize_profile(prof: Any, trace_path: Path | None) -> dict[str, Any]:
    """GPU time by kernel category and the top kernels of one profiled step; tables to ``trace_path``."""
    import torch

    cats: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            t = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            cats[kernel_category(ev.name)] = cats.get(kernel_category(ev.name), 0.0) + t
            kernels[ev.name] = kernels.get(ev.name, 0.0) + t
    total = sum(cats.values()) or 1.0
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    if trace_path is not None:
        averages = prof.key_averages()
        trace_path.write_text(
            averages.table(sort_by="self_cuda_time_total", row_limit=50)
            + "\n\n"
            + averages.table(sort_by="self_cpu_time_total", row_limit=50)
        )
    return {
        "gpu_ms": round(total / 1e3, 1),
        "kernel_launches": sum(1 for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA),
        "categories_pct": {k: round(100 * v / total, 1) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms": [[k[:90], round(v / 1e3, 2)] for k, v in top],
    }


def profile_step(step_fn: Any, trace_path: Path | None) -> dict[str, Any]:
    """Profile one call of ``step_fn`` (kernel time by category), then count its matmul FLOPs by dtype."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step_fn()
        torch.cuda.synchronize()
    result = summarize_profile(prof, trace_path)
    mode = MatmulFlops()
    with mode:
        step_fn()
    torch.cuda.synchronize()
    result["matmul_tflop_by_dtype"] = {k: round(v / 1e12, 2) for k, v in mode.flops.items()}
    return result


def graphs_state(model: Any) -> dict[str, Any] | None:
    """Whether the decoder layers ran as CUDA graphs (the speed point's, or those over the recomputed
    layers): replays, and why not when they did not."""
    for module in model.modules():
        graphs = module.__dict__.get("_qlora_decoder_graphs")
        if graphs is not None:
            return _graphs_row("speed point", graphs, graphs.graphed is not None)
        recompute = getattr(getattr(module, "_gradient_checkpointing_func", None), "graphs", None)
        if recompute is not None:
            return _graphs_row("recompute", recompute, recompute.captured is not None)
    return None


def _graphs_row(kind: str, graphs: Any, captured: bool) -> dict[str, Any]:
    return dict(
        kind=kind,
        captured=captured,
        replays=graphs.replays,
        off=graphs.disabled_because,
        eager=graphs.eager_because,
        last_key=str(graphs.last_key),
    )


class TokenCounter:
    """Counts the tokens a model really receives in training forwards (a forward pre-hook).

    What a step trains on is what reaches the model: a trainer may accumulate several
    micro-batches behind ``per_device_train_batch_size`` (Unsloth's does), pad, or pack.
    ``reset()`` starts the window (at the first timed step); ``count`` is the tokens since.
    """

    def __init__(self, model: Any) -> None:
        self.count = 0
        self.forwards = 0
        self.handle = model.register_forward_pre_hook(self._seen, with_kwargs=True)

    def _seen(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None and kwargs.get("inputs_embeds") is not None:
            self.count += int(kwargs["inputs_embeds"].shape[:-1].numel())
        elif ids is not None:
            self.count += int(ids.numel())
        self.forwards += 1

    def reset(self) -> None:
        self.count = 0
        self.forwards = 0
