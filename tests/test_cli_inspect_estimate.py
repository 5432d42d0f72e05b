"""``qlora inspect`` and ``qlora estimate`` on real (tiny and meta-device) models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import SRC, run_json, run_qlora

from qlora_plugin.commands.main import main

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def not_a_causal_lm(tmp_path_factory) -> Path:
    """A vision transformer's config: a model, but no causal LM."""
    from transformers import ViTConfig

    directory = tmp_path_factory.mktemp("vit")
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        directory
    )
    return directory


def peft_trainable_and_targets(model_dir: Path, **fields) -> tuple[int, set[str]]:
    """What PEFT itself adapts and trains when the recipe is applied to the real model."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora_plugin import qlora_recipe

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    recipe = qlora_recipe(model=model, **fields)
    peft_model = get_peft_model(model, recipe)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    adapted = {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A")
    }
    return trainable, adapted


def test_the_command_imports_light_and_answers_help_fast() -> None:
    code = (
        "import sys, qlora_plugin.commands.main; heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') "
        "if m in sys.modules]; print(heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(SRC)})
    assert result.stdout.strip() == "[]", result.stderr
    for command in ("inspect", "estimate", "merge", "convert-finlora"):
        shown = run_qlora(command, "--help")
        assert shown.returncode == 0 and "example:" in shown.stdout and f"qlora {command}" in shown.stdout


def test_inspect_matches_what_peft_adapts_on_the_real_model(tiny_model_dir) -> None:
    report = run_json("inspect", tiny_model_dir)
    trainable, adapted = peft_trainable_and_targets(tiny_model_dir)
    assert set(report["targets"]) == adapted
    assert report["trainable_params"] == trainable
    assert report["skipped"] == {"lm_head": "output head (kept out of LoRA and of 4-bit quantization)"}
    groups = {g["type"]: g for g in report["target_groups"]}
    assert set(groups) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(g["layer_ranges"] == "0-1" and g["count"] == 2 for g in groups.values())
    assert sum(g["lora_params"] for g in groups.values()) == trainable
    assert report["base_bytes"]["linear_4bit"] == bitsandbytes_bytes(tiny_model_dir)


def bitsandbytes_bytes(model_dir: Path) -> int:
    """Bytes of every tensor bitsandbytes keeps for the 4-bit layers of the really loaded model, each
    rounded up to the CUDA caching allocator's 512-byte blocks."""
    import math

    import torch

    from qlora_plugin import qlora_recipe
    from qlora_plugin.build.quantization import is_4bit

    model = qlora_recipe().load_model(model_dir)
    storages: dict[int, int] = {}  # shared tensors (bitsandbytes caches its code books) counted once
    for module in model.modules():
        if not is_4bit(module):
            continue
        state = module.weight.quant_state
        tensors = [module.weight.data, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
        assert all(isinstance(t, torch.Tensor) for t in tensors)
        for t in tensors:
            storages[t.untyped_storage().data_ptr()] = math.ceil(t.numel() * t.element_size() / 512) * 512
    return sum(storages.values())


def test_inspect_applies_preset_and_overrides(tiny_model_dir, capsys) -> None:
    assert main(["inspect", str(tiny_model_dir), "--preset", "paper", "--set", "r=8", "--set", "use_dora=true"]) == 0
    shown = capsys.readouterr().out
    trainable, _ = peft_trainable_and_targets(tiny_model_dir, r=8, use_dora=True)
    assert f"{trainable:,}" in shown and "r=8, alpha=16" in shown and "DoRA" in shown
    assert "Adapted modules (14)" in shown and "lm_head" in shown and "output head" in shown


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--preset", "papr"], "preset='papr': no such preset. Did you mean 'paper'? Fix:"),
        (["--set", "rank=4"], "rank=4: not a recipe field"),
        (["--set", "r"], "is not FIELD=VALUE"),
    ],
)
def test_inspect_rejects_bad_recipe_input(tiny_model_dir, args, expected, capsys) -> None:
    assert main(["inspect", str(tiny_model_dir), *args]) == 2
    error = capsys.readouterr().err
    assert error.startswith("qlora inspect: error: ") and expected in error and "Fix:" in error


def test_inspect_and_estimate_reject_missing_paths_and_other_models(tmp_path, not_a_causal_lm, capsys) -> None:
    for command in (["inspect"], ["estimate", "--seq", "64"]):
        assert main([command[0], str(tmp_path / "nowhere"), *command[1:]]) == 2
        assert "nowhere': does not exist" in capsys.readouterr().err
        assert main([command[0], str(not_a_causal_lm), *command[1:]]) == 2
        assert "model='vit': is not a causal language model" in capsys.readouterr().err


def test_estimate_through_the_console_script(tiny_model_dir, capsys) -> None:
    result = run_qlora("estimate", tiny_model_dir, "--seq", 64, "--batch", 2, "--gpu", "t4-16gb")
    assert result.returncode == 0, result.stderr
    for words in (
        "4-bit weights + double-quant constants",
        "activations",
        "logits and loss",
        "optimizer states",
        "peak GPU memory",
        "t4-16gb",
    ):
        assert words in result.stdout
    assert main(["estimate", str(tiny_model_dir), "--seq", "64", "--batch", "2", "--gpu", "t4-16gb", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["peak"] == data["allocator_peak"] + data["paged_optimizer"]
    assert data["gpus"][0]["fits"] and data["gpus"][0]["largest_batch"] > 2
    assert data["path"] == {
        "name": "fast",
        "recompute": "full",
        "fused_loss": True,
        "kernels": True,
        "adapter_dtype": "float32",
        "cached_constants": False,
        "tiled_mlp": True,
        "tiled_mlp_min_tokens": 32768,
        "offload_keep_layers": 0,
        "keep_mlp_layers": 0,
        "park_mlp_layers": 0,
        "host_available": None,
    }


def test_a_largest_batch_at_the_search_limit_is_shown_as_at_least(tiny_model_dir, capsys) -> None:
    """The search for the largest batch stops at 1024: a batch that reaches it may be larger, and says so."""
    from qlora_plugin.tools.estimate import BATCH_SEARCH_LIMIT

    assert main(["estimate", str(tiny_model_dir), "--seq", "128", "--gpu", "t4-16gb", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["gpus"]
    assert (row["largest_batch"], row["largest_batch_capped"]) == (BATCH_SEARCH_LIMIT, True)
    assert main(["estimate", str(tiny_model_dir), "--seq", "128", "--gpu", "t4-16gb"]) == 0
    last_row = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_row.split()[0] == "t4-16gb" and last_row.endswith(f"≥ {BATCH_SEARCH_LIMIT}"), last_row


def test_estimate_follows_each_path_parameter(eight_layer_config, capsys) -> None:
    def peak(*args: str) -> int:
        assert main(["estimate", str(eight_layer_config), "--seq", "1024", "--batch", "4", "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)["allocator_peak"]

    none, full, offload = (peak("--recompute", mode) for mode in ("none", "full", "offload"))
    assert none > full > offload
    assert peak("--no-fused-loss") > peak()
    assert peak("--no-kernels") > peak()
    assert peak("--cached-constants") > peak()
    assert peak("--path", "stock") > peak("--path", "fast", "--no-kernels", "--no-fused-loss")
    assert peak("--batch", "8") > peak()  # --batch given twice: argparse keeps the last


def test_estimate_rejects_bad_options(tiny_model_dir, capsys) -> None:
    cases = [
        (["--seq", "0"], "--seq=0: must be at least 1"),
        (["--seq", "64", "--gpu", "h100"], "--gpu='h100': is not a GPU this table knows"),
        (["--seq", "64", "--path", "stock", "--recompute", "offload"], "is a fast-path option"),
        (["--seq", "64", "--path", "stock", "--fused-loss"], "--fused-loss=True: is a fast-path option"),
    ]
    for args, expected in cases:
        assert main(["estimate", str(tiny_model_dir), *args]) == 2
        assert expected in capsys.readouterr().err


def test_estimate_is_within_15_percent_of_the_h100_measurements(tmp_path) -> None:
    """The committed H100 peaks (Llama-3.2-1B, Llama-3.1-8B shapes; stock and fast; 2 lengths x 2 batches)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import compare_estimate
    finally:
        sys.path.remove(str(BENCHMARKS))
    status = compare_estimate.main([str(BENCHMARKS / "results" / "memory_peaks_h100.json"), "--out", str(tmp_path)])
    results = json.loads((tmp_path / "estimate_vs_measured.json").read_text())
    assert status == 0
    assert len(results) == 28
    assert {(r["model"], r["path"]) for r in results} == {
        (m, p) for m in ("llama-3.2-1b", "llama-3.1-8b") for p in ("stock", "fast")
    }
    assert max(abs(r["error_pct"]) for r in results) <= 15
