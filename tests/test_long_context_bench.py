"""benchmarks/long_context.py on a CPU: the driver a GPU call depends on, on the tiny shape.

One attempt trains in a child process (bench_qlora.py run, batch 1, the recipe through
SFTTrainer); the next length is skipped because its predicted time exceeds the limit; a run
whose child fails records the failure and tries no longer length; a deadline already spent
skips everything and still writes the files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import long_context  # noqa: E402


def _load(out: Path) -> dict:
    return json.loads((out / "long_context.json").read_text())


@pytest.mark.slow
def test_driver_trains_in_a_child_and_stops_each_run_with_its_reason(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QLORA_FAST_PATH_ON_CPU", "1")
    out, models = tmp_path / "out", tmp_path / "models"
    runs = ["tiny/qlora-plugin-memory:64,4096", "tiny/no-such-variant:64,128"]
    args = ["--out", str(out), "--model-root", str(models), "--device", "cpu", "--steps", "1", "--warmup", "0"]
    assert long_context.main([*args, "--runs", *runs, "--attempt-limit", "300", "--deadline", "240"]) == 0

    data = _load(out)
    rows = {(r["variant"], r["seq"]): r for r in data["rows"]}
    assert set(rows) == {("qlora-plugin-memory", 64), ("qlora-plugin-memory", 4096), ("no-such-variant", 64)}
    trained = rows["qlora-plugin-memory", 64]
    assert trained["ok"] and trained["batch"] == 1 and trained["step_s"] > 0 and trained["tok_s"] > 0
    assert trained["estimate_gib"] > 0 and trained["gpu"] == "cpu (dry run)" and trained["versions"]["torch"]
    assert any("qlora fast path on" in line for line in trained["plugin_reports"])
    skipped = rows["qlora-plugin-memory", 4096]
    assert not skipped["ok"] and skipped["error"].startswith("skipped: predicted") and "wall_s" not in skipped
    failed = rows["no-such-variant", 64]
    assert not failed["ok"] and failed["error"].startswith("exit 2") and "invalid choice" in failed["error"]
    summary = {r["variant"]: r for r in data["runs"]}
    assert (
        summary["qlora-plugin-memory"]["max_seq"] == 64 and "4096: skipped" in summary["qlora-plugin-memory"]["stopped"]
    )
    assert summary["no-such-variant"]["max_seq"] is None
    table = (out / "long_context.md").read_text()
    assert "| tiny | qlora-plugin-memory | 64 |" in table
    assert (out / "long_context.png").exists() or (out / "long_context.svg").exists()
    assert (out / "attempts" / "tiny-qlora-plugin-memory-64.log").exists()


def test_a_spent_deadline_skips_every_run_and_still_writes_the_files(tmp_path) -> None:
    out = tmp_path / "out"
    argv = ["--out", str(out), "--model-root", str(tmp_path / "models"), "--device", "cpu", "--deadline", "0"]
    assert long_context.main([*argv, "--runs", "tiny/trl-qlora:64,128", "tiny/qlora-plugin-memory:64"]) == 0
    data = _load(out)
    assert [(r["variant"], r["seq"], r["ok"]) for r in data["rows"]] == [
        ("trl-qlora", 64, False),
        ("qlora-plugin-memory", 64, False),
    ]
    assert all("left of --deadline" in r["error"] for r in data["rows"])
    assert all(r["max_seq"] is None and "left of --deadline" in r["stopped"] for r in data["runs"])
    assert long_context.main(["--replot", str(out)]) == 0
    assert "stopped because" in (out / "long_context.md").read_text()


def test_attempt_budget_scales_the_last_step_with_the_square_of_the_length() -> None:
    assert long_context.predicted_seconds(262144, 1, {"seq": 131072, "step_s": 50.0}, 60.0) == 260.0
    assert long_context.predicted_seconds(262144, 1, None, 60.0) is None
    args = long_context.parse(["--out", "x", "--single-step-from", "131072", "--steps", "2", "--warmup", "1"])
    assert long_context.steps_for(65536, args) == (1, 2) and long_context.steps_for(131072, args) == (0, 1)
    assert long_context.Run.parse("8b/trl-qlora").lengths == long_context.LENGTHS["8b"]
    assert long_context.Run.parse("1b/qlora-plugin-memory:65536,32768").lengths == (32768, 65536)
