"""Host time of a training step under the two recompute functions, on a CPU (NOTES section 19).

A 16-layer NF4 + LoRA Llama so small (hidden 64, 8 tokens) that its step is almost all per-op host
work, the regime a 1B step on a GPU is in: the median step with torch's non-reentrant checkpoint
and with the plugin's own recompute, twice each, alternating. A proxy for the host thread's share,
not a GPU figure. Run from the repository root:

    QLORA_FAST_PATH_ON_CPU=1 python benchmarks/recompute_host_probe.py [--dir /tmp/recompute-probe]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _tiny_qlora import load_4bit, lora, tiny_llama_checkpoint  # noqa: E402

from qlora_plugin.fastpath.kernels import FastPathConfig, apply_fast_path  # noqa: E402


def median_step_ms(path: Path, *, own: bool, steps: int = 25, warmup: int = 5) -> float:
    model = lora(load_4bit(path), stock=False, dropout=0.05)
    apply_fast_path(model, config=FastPathConfig(compute_dtype=torch.float32, recompute="full", own_recompute=own))
    model.train()
    batch = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        times.append(time.perf_counter() - start)
    timed = sorted(times[warmup:])
    return 1000 * timed[len(timed) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "recompute-probe")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = tiny_llama_checkpoint(args.dir / "llama16", hidden=64, inter=128, layers=16)
    results: dict[str, list[float]] = {"torch's checkpoint": [], "own recompute": []}
    for own in (False, True, False, True):
        results["own recompute" if own else "torch's checkpoint"].append(median_step_ms(path, own=own))
    for name, values in results.items():
        print(f"{name}: " + ", ".join(f"{v:.1f}" for v in values) + " ms a step (median of 20)")


if __name__ == "__main__":
    main()
