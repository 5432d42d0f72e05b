"""``qlora estimate`` at long rows: offloaded recompute, the tiled MLP, batch 1.

The untiled model is checked against three peaks measured on an H100 before the tiled MLP
existed (Llama-3.1-8B shape, batch 1, the recipe with ``gradient_checkpointing="offload"``,
``torch.cuda.max_memory_allocated``): 18.5 GiB at 65,536 tokens, 31.1 GiB at 131,072 and
56.3 GiB at 262,144 (benchmarks/NOTES.md, "Long context").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from qlora_plugin import qlora_recipe
from qlora_plugin.commands.main import main
from qlora_plugin.tools.estimate import GIB, estimate, training_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from llama_shapes import llama_config  # noqa: E402

MEASURED_UNTILED_8B = {65536: 18.5, 131072: 31.1, 262144: 56.3}


@pytest.fixture(scope="module")
def llama_8b(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("llama-8b")
    llama_config("llama-3.1-8b").save_pretrained(directory)
    return directory


def test_the_estimate_follows_the_recipes_offload() -> None:
    path = training_path(qlora_recipe(gradient_checkpointing="offload"))
    assert path.recompute == "offload" and path.tiled_mlp
    assert training_path(qlora_recipe(gradient_checkpointing="offload", fast_path=False)).recompute == "full"


@pytest.mark.parametrize("seq", sorted(MEASURED_UNTILED_8B))
def test_untiled_offload_estimate_is_within_15_percent_of_the_h100_peaks(llama_8b, seq) -> None:
    recipe = qlora_recipe(gradient_checkpointing="offload")
    result = estimate(llama_8b, recipe, seq, 1, training_path(recipe, tiled_mlp=False))
    assert abs(result.allocator_peak / GIB / MEASURED_UNTILED_8B[seq] - 1) <= 0.15


def test_tiling_takes_the_mlp_out_of_the_per_token_bytes(llama_8b, capsys) -> None:
    def run(*args: str) -> dict:
        assert main(["estimate", str(llama_8b), "--batch", "1", "--recompute", "offload", "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    short_on, short_off = run("--seq", "16384"), run("--seq", "16384", "--no-tiled-mlp")
    assert short_on["allocator_peak"] == short_off["allocator_peak"]  # below the threshold: nothing tiles
    tiled, untiled = run("--seq", "400000"), run("--seq", "400000", "--no-tiled-mlp")
    assert tiled["activations"]["per_layer_per_token"] < 0.5 * untiled["activations"]["per_layer_per_token"]
    assert tiled["allocator_peak"] < 0.6 * untiled["allocator_peak"]
    assert tiled["allocator_peak"] < 70 * GIB < untiled["allocator_peak"]  # 8B at 400k fits an 80 GB card only tiled
    assert tiled["host_pinned"] == untiled["host_pinned"] == 32 * 4096 * 2 * 400000
    assert any("MLPs tiled: 49 slices" in note for note in tiled["notes"])
    # with the MLP tiled, the attention backward (flash's float32 query-gradient accumulator and
    # per-query-head key/value gradients) is the layer's largest moment
    assert tiled["peak_moment"] == "attention backward" and untiled["peak_moment"] == "layer backward"
    # each layer input kept on the GPU moves its bytes from the host to the GPU
    kept = run("--seq", "400000", "--offload-keep-layers", "6")
    assert kept["host_pinned"] == 26 * 4096 * 2 * 400000
    assert kept["allocator_peak"] - tiled["allocator_peak"] == 6 * 4096 * 2 * 400000


def test_the_estimate_reads_the_environment_training_reads(llama_8b, capsys, monkeypatch) -> None:
    """``QLORA_TILED_MLP`` and ``QLORA_OFFLOAD_KEEP_LAYERS`` change what training does, so the estimate follows them."""

    def run(*args: str) -> dict:
        assert main(["estimate", str(llama_8b), "--batch", "1", "--recompute", "offload", "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    default = run("--seq", "400000")
    monkeypatch.setenv("QLORA_TILED_MLP", "0")
    never = run("--seq", "400000")
    assert never["path"]["tiled_mlp_min_tokens"] == 0
    assert never["allocator_peak"] == run("--seq", "400000", "--no-tiled-mlp")["allocator_peak"]
    assert never["allocator_peak"] > default["allocator_peak"]
    monkeypatch.setenv("QLORA_TILED_MLP", "500000")  # a threshold above the row: nothing tiles
    assert run("--seq", "400000")["allocator_peak"] == never["allocator_peak"]
    monkeypatch.setenv("QLORA_TILED_MLP", "16384")  # a threshold below: 16,384-token rows tile
    assert run("--seq", "16384")["allocator_peak"] < run("--seq", "16384", "--no-tiled-mlp")["allocator_peak"]
    monkeypatch.delenv("QLORA_TILED_MLP")
    monkeypatch.setenv("QLORA_OFFLOAD_KEEP_LAYERS", "6")
    kept = run("--seq", "400000")
    assert kept["path"]["offload_keep_layers"] == 6 and kept["host_pinned"] == 26 * 4096 * 2 * 400000
    assert run("--seq", "400000", "--offload-keep-layers", "0")["host_pinned"] == 32 * 4096 * 2 * 400000
    # full recompute keeps every layer input anyway: the variable does not apply, as in training
    assert run("--seq", "16384", "--recompute", "full")["path"]["offload_keep_layers"] == 0


def test_kept_mlp_outputs_add_their_bytes_and_tiled_rows_keep_none(llama_8b, capsys, monkeypatch) -> None:
    """``--keep-mlp-layers`` / ``QLORA_KEEP_MLP_LAYERS``: each kept layer holds its gate and up outputs (bf16)."""

    def run(*args: str) -> dict:
        assert main(["estimate", str(llama_8b), "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    readme_shape = ("--seq", "2048", "--batch", "4")
    plain = run(*readme_shape)
    kept = run(*readme_shape, "--keep-mlp-layers", "16")
    held = 16 * 2 * 2 * 14336 * 4 * 2048
    assert plain["activations"]["kept_mlp_outputs"] == 0 and kept["activations"]["kept_mlp_outputs"] == held
    assert kept["allocator_peak"] - plain["allocator_peak"] == held
    assert run(*readme_shape, "--keep-mlp-layers", "99")["activations"]["kept_mlp_outputs"] == 2 * held  # 32 layers
    monkeypatch.setenv("QLORA_KEEP_MLP_LAYERS", "16")
    assert run(*readme_shape)["allocator_peak"] == kept["allocator_peak"]
    # a tiled MLP keeps nothing, and without recompute there is nothing to keep
    long = ("--seq", "400000", "--batch", "1", "--recompute", "offload")
    assert run(*long)["activations"]["kept_mlp_outputs"] == 0
    assert run(*readme_shape, "--recompute", "none")["path"]["keep_mlp_layers"] == 0
    monkeypatch.delenv("QLORA_KEEP_MLP_LAYERS")
    assert main(["estimate", str(llama_8b), *readme_shape, "--recompute", "none", "--keep-mlp-layers", "4"]) != 0
    assert "--keep-mlp-layers=4: only applies" in capsys.readouterr().err


def test_host_room_keeps_on_the_gpu_what_training_would(llama_8b, capsys) -> None:
    """``--host-gib``: layer inputs the host cannot pin stay on the GPU, split as training splits them."""
    from qlora_plugin.fastpath.stash_plan import HOST_PIECE_BYTES, plan_stash

    def run(*args: str) -> dict:
        assert main(["estimate", str(llama_8b), "--json", "--seq", "400000", "--recompute", "offload", *args]) == 0
        return json.loads(capsys.readouterr().out)

    per_layer = 4096 * 2 * 400000
    unlimited = run()
    for host_gib in (200, 60, 20, 0):
        room = run("--host-gib", str(host_gib))
        stay = plan_stash(
            32,
            per_layer,
            host_available=host_gib * GIB,
            host_total=host_gib * GIB,
            gpu_free=1 << 62,
            piece_bytes=HOST_PIECE_BYTES,
        ).on_gpu
        assert room["host_pinned"] == (32 - stay) * per_layer
        assert room["allocator_peak"] - unlimited["allocator_peak"] == min(stay, 30) * per_layer  # 2 were in flight
        assert (stay > 0) == (host_gib < 110)  # 97.7 GiB of inputs, a tenth of the host kept back
    for bad, problem in (("-1", "must be a number >= 0"), ("nan", "must be a number >= 0")):
        assert main(["estimate", str(llama_8b), "--seq", "2048", "--recompute", "offload", "--host-gib", bad]) != 0
        assert f"--host-gib={float(bad)}: {problem}" in capsys.readouterr().err
    assert main(["estimate", str(llama_8b), "--seq", "2048", "--recompute", "full", "--host-gib", "64"]) != 0
    assert "--host-gib=64.0: only applies to offloaded recompute" in capsys.readouterr().err


def test_parked_mlp_outputs_go_to_the_host_with_one_layer_on_its_way_back(llama_8b, capsys, monkeypatch) -> None:
    """``--park-mlp-layers`` / ``QLORA_PARK_MLP_LAYERS``: parked layers' outputs are host bytes; the GPU holds
    one layer's on its way back, and the layers kept on the GPU come after the parked ones."""

    def run(*args: str) -> dict:
        assert main(["estimate", str(llama_8b), "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    readme_shape = ("--seq", "2048", "--batch", "4")
    layer = 2 * 2 * 14336 * 4 * 2048
    plain = run(*readme_shape)
    parked = run(*readme_shape, "--park-mlp-layers", "16")
    assert parked["activations"]["parked_mlp_outputs"] == 16 * layer
    assert parked["host_pinned"] == 16 * layer
    assert parked["allocator_peak"] - plain["allocator_peak"] == layer
    both = run(*readme_shape, "--park-mlp-layers", "20", "--keep-mlp-layers", "20")  # 12 layers left to keep
    assert both["activations"]["kept_mlp_outputs"] == 12 * layer
    offload = run(*readme_shape, "--recompute", "offload", "--park-mlp-layers", "32")
    assert offload["host_pinned"] == 32 * layer + 32 * 4096 * 2 * 8192  # gate/up beside the layer inputs
    monkeypatch.setenv("QLORA_PARK_MLP_LAYERS", "16")
    assert run(*readme_shape)["allocator_peak"] == parked["allocator_peak"]
    monkeypatch.delenv("QLORA_PARK_MLP_LAYERS")
    for bad in ("-1", "4"):
        recompute = ("--recompute", "none") if bad == "4" else ()
        assert main(["estimate", str(llama_8b), *readme_shape, *recompute, "--park-mlp-layers", bad]) != 0
        assert f"--park-mlp-layers={bad}:" in capsys.readouterr().err
