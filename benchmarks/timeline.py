"""Where the GPU waits during a trainer step: idle gaps in a profiler trace, and what the host did then.

``annotate_trainer(trainer)`` wraps the trainer's step phases in ``record_function`` ranges
(``phase:...``); ``gpu_gaps(trace)`` reads a Chrome trace written by ``torch.profiler`` and
returns every stretch where no kernel, copy or memset ran, each with the host's phase stack
and innermost op at the moment the GPU went idle, plus the device read-backs (``.item()``,
``bool(tensor)``) and how long the host waited in each. Used by ``bench_qlora.py run --timeline``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
READ_BACKS = {"aten::_local_scalar_dense"}


def _ranged(name: str, fn: Any) -> Any:
    from torch.autograd.profiler import record_function

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapper


def annotate_trainer(trainer: Any) -> None:
    """Label the phases of ``trainer``'s steps (instance attributes only; the class is untouched)."""
    from torch.autograd.profiler import record_function
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    for attr in ("training_step", "compute_loss", "_clip_grad_norm", "get_batch_samples", "_prepare_inputs"):
        setattr(trainer, attr, _ranged(f"phase:{attr}", getattr(trainer, attr)))
    trainer.accelerator.backward = _ranged("phase:backward", trainer.accelerator.backward)
    handler = trainer.callback_handler
    for event in ("on_step_begin", "on_step_end", "on_pre_optimizer_step", "on_optimizer_step", "on_log"):
        setattr(handler, event, _ranged(f"phase:callbacks.{event}", getattr(handler, event)))
    model_forward = trainer.model.forward
    trainer.model.forward = _ranged("phase:model.forward", model_forward)
    open_ranges: list[Any] = []

    def pre(*_: Any) -> None:
        open_ranges.append(record_function("phase:optimizer.step"))
        open_ranges[-1].__enter__()

    def post(*_: Any) -> None:
        if open_ranges:
            open_ranges.pop().__exit__(None, None, None)

    register_optimizer_step_pre_hook(pre)
    register_optimizer_step_post_hook(post)


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def gpu_gaps(trace_path: Path, *, min_gap_us: float = 100.0, window: str = "phase:training_step") -> dict[str, Any]:
    """GPU idle gaps between the first and last ``window`` range of the trace, attributed to host phases."""
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    steps = sorted((e["ts"], e["ts"] + e["dur"]) for e in spans if e.get("name") == window)
    if not steps:
        return {"error": f"no {window!r} range in the trace"}
    main_tid = next(e["tid"] for e in spans if e.get("name") == window)
    # the window: from the end of the first step's host range to the end of the last one (one full cycle each)
    lo, hi = steps[0][1], steps[-1][1]
    busy = _merge([(e["ts"], e["ts"] + e["dur"]) for e in spans if e.get("cat") in GPU_CATEGORIES])
    busy = [(max(a, lo), min(b, hi)) for a, b in busy if b > lo and a < hi]
    host = sorted(
        (
            (e["ts"], e["ts"] + e["dur"], e["name"], e.get("cat"))
            for e in spans
            if e.get("tid") == main_tid and e.get("cat") in ("cpu_op", "user_annotation")
        ),
        key=lambda x: x[0],
    )

    def stack_at(t: float) -> tuple[list[str], str]:
        active = [h for h in host if h[0] <= t < h[1]]
        phases = [h[2].removeprefix("phase:") for h in active if h[2].startswith("phase:")]
        ops = [h[2] for h in active if h[3] == "cpu_op"]
        return phases, (ops[-1] if ops else "")

    gaps = []
    for (_, end), (start, _) in zip(busy, busy[1:], strict=False):
        if start - end >= min_gap_us:
            phases, op = stack_at(end + 1.0)
            gaps.append({"gap_ms": round((start - end) / 1e3, 3), "phases": phases, "host_op": op})
    by_place: dict[str, float] = {}
    for g in gaps:
        place = " > ".join(g["phases"][-2:]) + (f" [{g['host_op']}]" if g["host_op"] else "")
        by_place[place] = by_place.get(place, 0.0) + g["gap_ms"]
    read_backs: dict[str, dict[str, float]] = {}  # per place: how many, and the host's total wait
    for s, e, name, _category in host:
        if name in READ_BACKS and lo <= s < hi:
            phases, _ = stack_at(s + 0.5)
            outer = next((h[2] for h in host if h[3] == "cpu_op" and h[0] <= s and e <= h[1]), name)
            place = f"{' > '.join(phases[-2:]) or 'between steps'} [{outer}]"
            entry = read_backs.setdefault(place, {"count": 0, "wait_ms": 0.0})
            entry["count"] += 1
            entry["wait_ms"] = round(entry["wait_ms"] + (e - s) / 1e3, 3)
    total = (hi - lo) / 1e3
    idle = sum(g["gap_ms"] for g in gaps)
    return {
        "window_ms": round(total, 2),
        "steps": len(steps) - 1,
        "gpu_busy_ms": round(sum(b - a for a, b in busy) / 1e3, 2),
        "gpu_idle_ms_in_gaps": round(idle, 2),
        "idle_by_host_place_ms": dict(sorted(((k, round(v, 2)) for k, v in by_place.items()), key=lambda kv: -kv[1])),
        "largest_gaps": sorted(gaps, key=lambda g: -g["gap_ms"])[:20],
        "read_backs": read_backs,
    }


if __name__ == "__main__":
    import sys

    print(json.dumps(gpu_gaps(Path(sys.argv[1])), indent=1))
