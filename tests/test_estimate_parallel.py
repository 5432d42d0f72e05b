"""``qlora estimate --gpus N --strategy ddp|fsdp``: the per-GPU arithmetic and bad input."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from qlora_plugin.commands.main import main
from qlora_plugin.core.fields import recipe_spec
from qlora_plugin.tools.estimate import Parallel, estimate_memory, training_path
from qlora_plugin.tools.inspection import analyze

SHARDED = ("weights_4bit", "unquantized_params", "adapters", "gradients", "optimizer_states")


@pytest.fixture(scope="module")
def report(eight_layer_config):
    return analyze(eight_layer_config, recipe_spec(optimizer="adamw_torch"))  # all optimizer states in the allocator


def test_fsdp_divides_what_it_shards_and_adds_the_gathered_layer(report) -> None:
    without_kernels = replace(training_path(report.recipe), kernels=False, tiled_mlp=False)  # as under FSDP
    one = estimate_memory(report, 1024, 2, path=without_kernels)
    two = estimate_memory(report, 1024, 2, parallel=Parallel(2, "fsdp"))
    assert two.path == without_kernels  # the fast path's fused layer kernels stay off under FSDP
    for key in SHARDED:
        assert two.components[key] == math.ceil(one.components[key] / 2), key
    assert two.components["weights_4bit"] * 2 == pytest.approx(one.components["weights_4bit"], abs=1)
    assert two.components["activations"] == one.components["activations"]  # per GPU, unchanged
    assert two.components["loss"] == one.components["loss"]
    layers = 8
    root = 2 * (2 * 32000 * 512 + 512)  # embeddings + untied head + final norm, bf16
    per_layer = (
        one.components["weights_4bit"] + one.components["unquantized_params"] - root + one.components["adapters"]
    )
    gathered = root + math.ceil(per_layer / layers) + math.ceil(one.components["gradients"] / layers)
    assert two.components["fsdp_all_gather"] == gathered
    assert "ddp_buckets" not in two.components
    # the optimizer step holds exactly what is sharded (adamw_torch: every state in the allocator)
    assert one.moments["optimizer step"] == sum(one.components[key] for key in SHARDED)
    assert two.moments["optimizer step"] == sum(two.components[key] for key in SHARDED)
    four = estimate_memory(report, 1024, 2, parallel=Parallel(4, "fsdp"))
    assert four.components["weights_4bit"] == math.ceil(one.components["weights_4bit"] / 4)
    assert four.peak < two.peak < one.peak + gathered
    assert estimate_memory(report, 1024, 2).components["activations"] < one.components["activations"]


def test_fsdp_sharding_holds_the_loaded_replica_and_its_shards(report) -> None:
    one = estimate_memory(report, 1024, 2)
    replica = sum(one.components[key] for key in ("weights_4bit", "unquantized_params", "adapters"))
    for gpus in (2, 4):
        sharded = estimate_memory(report, 1024, 2, parallel=Parallel(gpus, "fsdp"))
        assert sharded.moments["fsdp sharding"] == replica + math.ceil(replica / gpus)
    assert "fsdp sharding" not in estimate_memory(report, 1024, 2, parallel=Parallel(2, "ddp")).moments


def test_the_70b_fsdp_estimate_is_its_measured_sharding_peak(tmp_path) -> None:
    """Run 10 (two H100s, benchmarks/results/run10-multigpu): 70B at 1 x 2,048 peaked at 55.86 GiB per GPU
    while sharding (29.52 GiB in the steps); 8B and 1B at 4 x 2,048 at 8.67 and 3.22 GiB in their steps,
    which run PEFT's forward (the fused kernels stay off under FSDP)."""
    import sys
    from pathlib import Path

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(benchmarks))
    from llama_shapes import llama_config
    from multigpu_job import job_recipe

    measured = {
        "llama-3.1-70b": (1, 55.858, "fsdp sharding"),
        "llama-3.1-8b": (4, 8.667, "layer backward"),
        "llama-3.2-1b": (4, 3.224, "layer backward"),
    }
    for shape, (batch, peak_gib, moment) in measured.items():
        llama_config(shape).save_pretrained(tmp_path / shape)
        fsdp = estimate_memory(
            analyze(tmp_path / shape, job_recipe("auto", None)), 2048, batch, parallel=Parallel(2, "fsdp")
        )
        assert fsdp.peak_moment == moment, shape
        assert fsdp.optimizer == "adamw_torch" and fsdp.paged_optimizer == 0  # what the recipe trains with there
        assert not fsdp.path.kernels and not fsdp.path.tiled_mlp
        assert abs(peak_gib / (fsdp.allocator_peak / 1024**3) - 1) <= 0.15, shape


def test_ddp_is_one_gpu_plus_the_gradient_buckets(report) -> None:
    one = estimate_memory(report, 1024, 2)
    two = estimate_memory(report, 1024, 2, parallel=Parallel(2, "ddp"))
    buckets = one.components["gradients"]  # one flat copy of every adapter gradient (fp32 here)
    assert buckets == 4 * report.trainable_params
    assert two.components == {**one.components, "ddp_buckets": buckets}
    assert all(two.moments[moment] == one.moments[moment] + buckets for moment in one.moments)
    assert two.peak == one.peak + buckets
    eight = estimate_memory(report, 1024, 2, parallel=Parallel(8, "ddp"))
    assert eight.peak == two.peak  # replicas: the GPU count does not change a GPU's memory
    alone = estimate_memory(report, 1024, 2, parallel=Parallel(1, "ddp"))
    assert alone.components == one.components  # one process: no DDP wrapper, no buckets
    assert estimate_memory(report, 1024, 2, parallel=Parallel(1, "fsdp")).components == one.components


def test_the_command_takes_gpus_and_strategy(eight_layer_config, capsys) -> None:
    def run(*args: str) -> dict:
        assert main(["estimate", str(eight_layer_config), "--seq", "1024", "--batch", "2", "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    one, ddp, fsdp = run(), run("--gpus", "2"), run("--gpus", "2", "--strategy", "fsdp")
    assert ddp["parallel"] == {"gpus": 2, "strategy": "ddp"} and fsdp["parallel"] == {"gpus": 2, "strategy": "fsdp"}
    assert ddp["peak"] > one["peak"]
    # this small model's unsharded root (32k x 512 embeddings and head) outweighs half its layers: more GPUs help
    assert run("--gpus", "4", "--strategy", "fsdp")["peak"] < fsdp["peak"]
    assert fsdp["components"]["weights_4bit"] == math.ceil(one["components"]["weights_4bit"] / 2)
    assert main(["estimate", str(eight_layer_config), "--seq", "256", "--gpus", "2", "--strategy", "fsdp"]) == 0
    shown = capsys.readouterr().out
    assert "2 GPUs, FSDP: per GPU" in shown and "FSDP all-gathered" in shown


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--gpus", "0"], "--gpus=0: must be a whole number of GPUs, at least 1. Fix: pass --gpus 1 or more"),
        (["--gpus", "-2"], "--gpus=-2: must be a whole number of GPUs"),
        (
            ["--strategy", "foo"],
            "--strategy='foo': is not a multi-GPU strategy this estimate knows. Fix: pass --strategy ddp",
        ),
        (["--strategy", "fsdb"], "Did you mean 'fsdp'?"),
    ],
)
def test_bad_gpus_or_strategy_is_one_line_and_exit_2(eight_layer_config, capsys, args, expected) -> None:
    assert main(["estimate", str(eight_layer_config), "--seq", "64", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1
