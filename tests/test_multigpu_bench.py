"""benchmarks/multigpu.py and multigpu_job.py: the parts a GPU call depends on, checked on a CPU in seconds.

The end-to-end run on the tiny shape is the slow test in tests/test_multi_gpu.py; these cover what
it cannot provoke: a hung variant killed with its ranks, a failure reported by its exact message,
a deadline that leaves no room, the targets read off the rows, altered 4-bit bytes noticed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import multigpu  # noqa: E402
import multigpu_job  # noqa: E402

from qlora_plugin import qlora_recipe  # noqa: E402


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_variant_past_its_limit_is_killed_with_every_process_it_started(tmp_path) -> None:
    """accelerate launch starts the ranks as children; killing only the launcher would leave them on the GPUs."""
    pid_file = tmp_path / "rank.pid"
    command = ["bash", "-c", f"sleep 120 & echo $! > {pid_file}; wait"]  # a launcher and its rank
    started = time.monotonic()
    code = multigpu.run_group(command, dict(os.environ), 2, tmp_path / "log")
    assert code is None and time.monotonic() - started < 30
    rank = int(pid_file.read_text())
    for _ in range(50):
        if not _alive(rank):
            break
        time.sleep(0.1)
    assert not _alive(rank)


def test_a_variant_that_finishes_returns_its_exit_code_and_log(tmp_path) -> None:
    code = multigpu.run_group(["bash", "-c", "echo hello; exit 3"], dict(os.environ), 30, tmp_path / "log")
    assert code == 3 and (tmp_path / "log").read_text() == "hello\n"


def test_the_failure_is_each_ranks_exact_exception(tmp_path) -> None:
    for rank in (0, 1):
        record = {"rank": rank, "error": "ValueError: quant_state is required", "traceback": "..."}
        (tmp_path / f"v.rank{rank}.error.json").write_text(json.dumps(record))
    files = sorted(tmp_path.glob("v.rank*.error.json"))
    assert multigpu.failure_text(tmp_path / "none.log", files) == "rank 0,1: ValueError: quant_state is required"


def test_without_error_files_the_last_exception_line_of_the_log_is_reported(tmp_path) -> None:
    log = tmp_path / "v.log"
    log.write_text(
        "Traceback (most recent call last):\n"
        '[rank1]:   File "x.py", line 3, in <module>\n'
        "[rank1]: NotImplementedError: Operator bitsandbytes.optimizer_update_32bit.default does not have a "
        "sharding strategy registered.\n"
        "E1126 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 0\n"
        "  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html\n"
        "=====================================\n"
    )
    assert multigpu.failure_text(log, []).startswith("NotImplementedError: Operator bitsandbytes.optimizer_update")
    log.write_text("training...\n  exitcode  : -11 (pid: 1065)\n  error_file: <N/A>\n")
    assert multigpu.failure_text(log, []) == "exitcode  : -11 (pid: 1065)"


@pytest.fixture(scope="module")
def tiny_config_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    multigpu.make_checkpoint("tiny", root, config_only=True)
    return root / "tiny"


def test_a_variant_the_deadline_leaves_no_room_for_is_skipped_with_its_estimate(tiny_config_dir, tmp_path) -> None:
    stage = multigpu.STAGES["tiny"]
    clock = multigpu.Clock(deadline=30)
    row = multigpu.run_variant(stage, "ddp-2gpu", tiny_config_dir, tmp_path, clock)
    assert row["error"].startswith("skipped:") and "deadline" in row["error"]
    assert row["estimate_gib"] > 0  # qlora estimate, in this process, for the recipe the job trains


def test_the_command_line_overrides_every_stage_named() -> None:
    args = multigpu.parse(["8b", "70b", "--out", "x", "--steps", "6", "--variants", "fsdp2-2gpu"])
    eight, seventy = (multigpu.stage_for(name, args) for name in args.stages)
    assert (eight.shape, eight.steps, eight.variants, eight.batch) == ("llama-3.1-8b", 6, ("fsdp2-2gpu",), 4)
    assert (seventy.shape, seventy.batch, seventy.build_in_place) == ("llama-3.1-70b", 1, True)
    assert multigpu.parse(["--out", "x"]).stages == ["8b", "70b"]


def _row(variant: str, tok_s: float, losses: list[float], **extra) -> dict:
    return {
        "shape": "llama-3.1-8b",
        "variant": variant,
        "gpus": 1 if variant == "single-gpu" else 2,
        "tok_s": tok_s,
        "losses": losses,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "timed_steps": 2,
        "steps": 3,
        "peak_gib": [9.0],
        "steady_peak_gib": [9.0],
        "load_peak_gib": [5.0],
        **extra,
    }


def test_the_targets_are_read_off_the_rows() -> None:
    rows = [
        _row("single-gpu", 1000.0, [12.0, 11.0, 10.0], estimate_ratio=0.94),
        _row("ddp-2gpu", 1950.0, [12.0, 11.05, 10.0]),
        _row("fsdp2-2gpu", 900.0, [12.0, 11.5, 10.0], fsdp=True, weights_checked=[7, 7], weights_changed=[0, 1]),
        {"shape": "llama-3.1-70b", "variant": "fsdp2-2gpu", "gpus": 2, "error": "timed out after 200 s"},
    ]
    multigpu.annotate(rows)
    assert rows[1]["speedup_vs_single"] == 1.95 and rows[1]["loss_gap_vs_single_pct"] == pytest.approx(0.455, abs=1e-3)
    assert rows[2]["loss_gap_vs_ddp_pct"] == pytest.approx(4.072, abs=1e-3)
    said = "\n".join(multigpu.targets(rows))
    assert "8B DDP tok/s over one GPU >= 1.85x: 1.95, met" in said
    assert "8B DDP losses within 1 % of one GPU (largest gap %): 0.455, met" in said
    assert "8B FSDP2 trains: True, met" in said and "losses within 1 % of DDP (largest gap %): 4.072, MISSED" in said
    assert "70B FSDP2 per-GPU peak (load or train) <= 70 GiB: -, not measured (timed out after 200 s)" in said
    assert "estimate within 15 %, llama-3.1-8b single-gpu (train peak / estimate): 0.94, met" in said
    assert "(14 layer copies checked; changed): 1, MISSED" in said
    text = multigpu.table(rows)
    assert "| llama-3.1-70b | fsdp2-2gpu | 2 | | | | | |" in text and "timed out after 200 s" in text


def test_the_zero3_targets_are_read_off_its_row() -> None:
    rows = [
        _row("ddp-2gpu", 1950.0, [12.0, 11.0, 10.0]),
        _row(
            "deepspeed-zero3-2gpu",
            900.0,
            [12.0, 11.0, 10.05],
            sharding="DeepSpeed ZeRO-3",
            weights_checked=[7, 7],
            weights_changed=[0, 0],
            local_4bit_fraction=[0.5, 0.5],
            adapter={"shapes_match": True, "finite": True, "config": True},
        ),
        _row("fsdp2-2gpu", 900.0, [12.0, 11.0, 10.0], sharding="FSDP", local_4bit_fraction=[1.0, 1.0]),
    ]
    multigpu.annotate(rows)
    assert rows[1]["loss_gap_vs_ddp_pct"] == 0.5
    said = "\n".join(multigpu.targets(rows))
    assert "8B DeepSpeed ZeRO-3 trains: True, met" in said
    assert "8B DeepSpeed ZeRO-3 losses within 1 % of DDP (largest gap %): 0.5, met" in said
    assert "8B DeepSpeed ZeRO-3 adapter saved whole: " in said and said.count("saved whole: {") == 1
    assert "4-bit bytes intact under DeepSpeed ZeRO-3, llama-3.1-8b (14 layer copies checked; changed): 0, met" in said
    assert "4-bit weights partitioned under DeepSpeed ZeRO-3, llama-3.1-8b (each rank's resident share" in said
    assert "elements): [0.5, 0.5], met" in said
    assert (
        "4-bit weights partitioned under FSDP, llama-3.1-8b (each rank's resident share of the packed "
        "elements): [1.0, 1.0], MISSED" in said
    )  # held whole on every rank: nothing saved


def test_the_zero3_variant_launches_with_its_config_and_is_skipped_without_deepspeed(
    tiny_config_dir, tmp_path, monkeypatch
) -> None:
    command = multigpu.launch_command("deepspeed-zero3-2gpu")
    assert command[command.index("--config_file") + 1].endswith("configs/accelerate/deepspeed-zero3.yaml")
    assert "--mixed_precision" not in command  # the config's bf16 on GPUs
    on_cpu = multigpu.launch_command("deepspeed-zero3-2gpu", cpu=True)
    assert on_cpu[on_cpu.index("--mixed_precision") + 1] == "no"  # the tiny job computes in float32
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # not importable here, as in CI
    stage = multigpu.stage_for("tiny", multigpu.parse(["tiny", "--out", "x", "--variants", "deepspeed-zero3-2gpu"]))
    assert stage.variants == ("deepspeed-zero3-2gpu",) and "deepspeed-zero3-2gpu" not in multigpu.STAGES["8b"].variants
    row = multigpu.run_variant(stage, "deepspeed-zero3-2gpu", tiny_config_dir, tmp_path, multigpu.Clock(None))
    assert row["error"].startswith("skipped: deepspeed is not installed") and row["estimate_gib"] > 0
    assert not list(tmp_path.glob("*.log"))  # nothing was launched


def test_a_failure_after_the_row_keeps_the_measurements() -> None:
    rows = [_row("fsdp2-2gpu", 900.0, [12.0, 11.0, 10.0], error_after_row="exit -11: exitcode  : -11")]
    multigpu.annotate(rows)
    line = next(x for x in multigpu.table(rows).splitlines() if "fsdp2-2gpu" in x)
    assert "| 900 |" in line and "after the row: exit -11" in line
    assert "8B FSDP2 trains: True, met" in "\n".join(multigpu.targets(rows))


def test_the_weight_watch_notices_a_changed_byte_at_a_layers_first_forward() -> None:
    from qlora_plugin.build.quantization import quantize_linear

    recipe = qlora_recipe(compute_dtype="float32")
    model = torch.nn.Sequential(*(quantize_linear(torch.nn.Linear(64, 64), recipe, torch.float32) for _ in range(2)))
    watch = multigpu_job.WeightWatch(model)
    model[1].weight.data.view(torch.uint8)[5] ^= 0x10  # one nibble of one layer, as a float copy could alter it
    model(torch.randn(2, 64))
    model(torch.randn(2, 64))  # checked once per layer
    assert watch.checked == 2 and watch.changed == ["1"]


def test_a_weight_check_that_cannot_run_is_recorded_not_raised(monkeypatch) -> None:
    from qlora_plugin.build.quantization import quantize_linear

    model = quantize_linear(torch.nn.Linear(64, 64), qlora_recipe(compute_dtype="float32"), torch.float32)
    watch = multigpu_job.WeightWatch(model)

    def broken(_tensor):
        raise RuntimeError("no bytes here")

    monkeypatch.setattr(multigpu_job, "byte_checksum", broken)
    model(torch.randn(2, 64))
    assert watch.checked == 0 and watch.changed == [] and watch.failed == [": RuntimeError: no bytes here"]


def test_the_byte_checksum_sees_a_moved_byte() -> None:
    data = torch.arange(100, dtype=torch.uint8)
    swapped = data.clone()
    swapped[[3, 4]] = swapped[[4, 3]]
    assert multigpu_job.byte_checksum(data) == multigpu_job.byte_checksum(data.clone())
    assert multigpu_job.byte_checksum(data)[0] == multigpu_job.byte_checksum(swapped)[0]  # the plain sum cannot
    assert multigpu_job.byte_checksum(data) != multigpu_job.byte_checksum(swapped)


def test_the_adapter_check_wants_every_tensor_at_its_full_shape(tmp_path) -> None:
    from safetensors.torch import save_file

    expected = {"m.q_proj.lora_A.weight": (4, 64), "m.q_proj.lora_B.weight": (64, 4)}
    save_file(
        {"m.q_proj.lora_A.weight": torch.ones(4, 64), "m.q_proj.lora_B.weight": torch.ones(64, 4)},
        tmp_path / "adapter_model.safetensors",
    )
    (tmp_path / "adapter_config.json").write_text("{}")
    good = multigpu_job.check_adapter(tmp_path, expected)
    assert good["shapes_match"] and good["finite"] and good["lora_B_trained"] and good["config"]
    save_file(
        {"m.q_proj.lora_A.weight": torch.ones(2, 64), "m.q_proj.lora_B.weight": torch.zeros(64, 4)},
        tmp_path / "adapter_model.safetensors",
    )
    sharded = multigpu_job.check_adapter(tmp_path, expected)  # a rank's shard saved as if whole
    assert not sharded["shapes_match"] and not sharded["lora_B_trained"]


FAKE_JOB = """
import json, pathlib, sys
out = pathlib.Path(sys.argv[sys.argv.index("--out") + 1])
out.with_name(out.stem + ".rank0.progress.json").write_text(json.dumps({"rank": 0, "phase": "step 2", "seconds": 9.5}))
if "MODE" == "row":
    out.write_text(json.dumps({"tok_s": 5.0, "losses": [1.0], "steady_peak_gib": [2.0], "peak_gib": [3.0]}))
print("[rank0]: RuntimeError: boom while saving", flush=True)
sys.exit(1)
"""


@pytest.mark.parametrize("mode", ["row", "none"])
def test_a_job_failing_after_or_before_its_row(tiny_config_dir, tmp_path, monkeypatch, mode: str) -> None:
    """After its row (the adapter save): measurements kept, the failure beside them; before: the error, and how far
    the ranks got."""
    monkeypatch.setattr(
        multigpu, "launch_command", lambda variant, **_: [sys.executable, "-c", FAKE_JOB.replace("MODE", mode)]
    )
    row = multigpu.run_variant(multigpu.STAGES["tiny"], "fsdp2-2gpu", tiny_config_dir, tmp_path, multigpu.Clock(None))
    if mode == "row":
        assert row["tok_s"] == 5.0 and "error" not in row
        assert row["error_after_row"] == "exit 1: RuntimeError: boom while saving"
        assert row["estimate_ratio"] == pytest.approx(3.0 / row["estimate_gib"], rel=1e-2)  # the training peak
    else:
        assert "tok_s" not in row and row["error"] == "exit 1: RuntimeError: boom while saving"
        assert row["progress"] == [{"rank": 0, "phase": "step 2", "seconds": 9.5}]
        assert "reached rank 0: step 2 at 9.5 s" in multigpu.table([row])


def test_the_one_gpu_70b_rows_are_read_and_a_bad_one_is_named() -> None:
    import argparse

    import one_gpu_70b

    assert one_gpu_70b.parse_row("offload:98304") == ("offload", 98304)
    for bad in ("fast:4096", "offload", "offload:", "full:4k", "none:8"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"row '{bad}': write MODE:SEQ"):
            one_gpu_70b.parse_row(bad)
    assert multigpu_job.job_recipe(recompute="offload").gradient_checkpointing == "offload"
    assert multigpu_job.job_recipe(recompute="none").gradient_checkpointing is False


def test_the_one_gpu_70b_driver_skips_a_long_row_the_time_left_cannot_hold(tmp_path, monkeypatch) -> None:
    """A long row that took 100 s predicts 400 s for twice its length: with less left, it is skipped, not started."""
    import one_gpu_70b

    started: list[int] = []

    def fake_run(shape: str, mode: str, seq: int, out: Path, limit: float) -> dict:
        started.append(seq)
        return {"shape": shape, "recompute": mode, "seq": seq, "ok": True, "wall_s": 100, "tok_s": 1.0, "peak_gib": 1.0}

    monkeypatch.setattr(one_gpu_70b, "run_row", fake_run)
    monkeypatch.setattr(one_gpu_70b, "estimate_gib", lambda *a: 1.0)
    assert one_gpu_70b.main(["--out", str(tmp_path), "--shape", "tiny", "--rows", "offload:32768", "offload:65536",
                             "--deadline", "300"]) == 0  # fmt: skip
    assert started == [32768]
    rows = json.loads((tmp_path / "one_gpu_70b.json").read_text())
    assert rows[1]["error"].startswith("skipped:") and "about 400 s needed" in rows[1]["error"]
    assert "| offload | 65,536 | no |" in (tmp_path / "one_gpu_70b.md").read_text()
