"""A quiet, quick ``qlora``: no third-party warnings in its output, and the config-only subcommands
never import torch; inspect/estimate read common decoder configs without it, and agree with the
meta-device model they used to build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import SRC, run_qlora

FINLORA = Path(__file__).parent / "data" / "finlora_finetune_configs.json"
REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "trl", "axolotl", "triton", "liger_kernel")


def imports_of(
    *argv: str, cwd: Path = REPO, status: int | None = 0, env: dict[str, str] | None = None
) -> tuple[list[str], str, str]:
    """Run ``qlora ARGV`` in a fresh interpreter; the heavy libraries it imported, its stdout and stderr."""
    code = (
        "import sys\nfrom qlora_plugin.commands.main import main\n"
        "try:\n    status = main(sys.argv[1:])\nexcept SystemExit as stop:  # --help\n    status = stop.code or 0\n"
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr); sys.exit(status)"
    )
    env = dict(env or dict(os.environ, HF_HUB_OFFLINE="1"), PYTHONPATH=str(SRC))
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, cwd=cwd, check=False, timeout=300
    )
    assert status is None or done.returncode == status, done.stderr
    *rest, heavy = done.stderr.strip().splitlines()
    return json.loads(heavy.removeprefix("HEAVY ").replace("'", '"')), done.stdout, "\n".join(rest)


@pytest.mark.parametrize(
    "argv",
    [
        ["presets"],
        ["convert-finlora", str(FINLORA), "sentiment_llama_3_1_8b_4bits_r4", "--out", "{tmp}/out.yml"],
        ["estimate", "examples/assets/tiny-llama", "--seq", "96", "--batch", "4"],
        ["inspect", "examples/assets/tiny-llama", "--preset", "paper", "--set", "target_modules=[q_proj,v_proj]"],
        ["check", "configs/qlora.yml"],
        ["--help"],
        ["estimate", "--help"],
    ],
    ids=["presets", "convert-finlora", "estimate", "inspect", "check", "help", "estimate-help"],
)
def test_config_only_subcommands_import_no_heavy_library_and_print_no_warnings(argv, tmp_path) -> None:
    heavy, stdout, stderr = imports_of(*(arg.replace("{tmp}", str(tmp_path)) for arg in argv))
    assert heavy == [] and stderr == "" and stdout


@pytest.mark.parametrize("command", [["inspect"], ["estimate", "--seq", "96"]])
def test_inspect_and_estimate_read_the_model_and_section_of_an_axolotl_config(command) -> None:
    """``qlora inspect configs/qlora.yml``: its base_model, with its qlora: section as the recipe, in a moment."""
    heavy, stdout, stderr = imports_of(command[0], "configs/qlora.yml", *command[1:])
    assert heavy == [] and stderr == ""
    assert stdout.startswith("./examples/assets/tiny-llama")
    if command[0] == "inspect":
        assert "compute float32" in stdout and "Adapted modules (28)" in stdout


def test_the_recipe_line_states_the_precision_it_computes_in() -> None:
    """``compute_dtype: float32`` (both shipped configs) is reported as such, never as bf16."""
    for argv in (["check", "configs/qlora.yml"], ["check", "configs/qlora-smollm2.yml"]):
        _, stdout, _ = imports_of(*argv, status=None)  # the second config's model may not be prepared here
        recipe_line = next(line for line in stdout.splitlines() if line.startswith("ok: qlora:"))
        assert "compute float32; fast path" in recipe_line and "bf16" not in recipe_line, recipe_line

    def recipe_line(*settings: str) -> str:
        _, stdout, _ = imports_of("inspect", "examples/assets/tiny-llama", *settings)
        return " ".join(stdout.split("\n\n")[0].split()).split(" recipe ", 1)[1]  # rich wraps long lines

    assert recipe_line("--set", "compute_dtype=float32").endswith("compute float32; fast path")
    stock = recipe_line("--set", "fast_path=false", "--set", "compute_dtype=fp16")
    assert stock.endswith("compute fp16; stock path (PEFT upcasts norms and embeddings to fp32)")
    assert recipe_line().endswith("compute bf16 (fp16 on GPUs without bf16); fast path (no fp32 upcasts)")


NOT_A_MODEL = {
    "config without base_model": (["{tmp}/no-base.yml"], ("no-base.yml: base_model", "set base_model")),
    "a file that is no config": (["README.md"], ("model='README.md'", "is a file, not a directory", "Axolotl YAML")),
    "a directory without config.json": (["configs"], ("model='configs'", "holds no config.json")),
    "a path that does not exist": (["./no-such-model"], ("model='./no-such-model'", "does not exist")),
    "a config whose base_model is missing": (["{tmp}/lost.yml"], ("lost.yml: base_model='./lost'", "does not exist")),
    "a hub id while offline": (["org/model"], ("model='org/model'", "HF_HUB_OFFLINE")),
    "a hub id the hub cannot answer": (["org/model", "HF_ENDPOINT=http://127.0.0.1:9"], ("cannot be reached",)),
}


@pytest.mark.parametrize("command", ["inspect", "estimate"])
@pytest.mark.parametrize("case", list(NOT_A_MODEL))
def test_a_model_argument_that_cannot_work_fails_at_once(command, case, tmp_path) -> None:
    """One line naming the argument, the value and what to give, before torch or transformers is imported
    (they take seconds to import; the hub client would retry for seconds more)."""
    from bad_inputs import assert_one_line_error

    (tmp_path / "no-base.yml").write_text("qlora: {r: 8}\n")
    (tmp_path / "lost.yml").write_text("base_model: ./lost\nqlora: {}\n")
    (argument, *settings), names = NOT_A_MODEL[case]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    env |= dict(setting.split("=", 1) for setting in settings) or {"HF_HUB_OFFLINE": "1"}
    extra = ["--seq", "64"] if command == "estimate" else []
    started = time.monotonic()
    heavy, stdout, stderr = imports_of(command, argument.replace("{tmp}", str(tmp_path)), *extra, status=2, env=env)
    assert heavy == [] and stdout == "" and time.monotonic() - started < 20
    assert stderr.startswith(f"qlora {command}: error: ")
    assert_one_line_error(stderr, *names)


def test_a_model_built_on_the_meta_device_prints_no_third_party_warnings(tmp_path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=96).save_pretrained(tmp_path)
    result = run_qlora("inspect", tmp_path)
    assert result.returncode == 0 and "GPT2LMHeadModel" in result.stdout
    assert result.stderr == ""


FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def saved_config(name: str, directory: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    from architectures import configs

    config = configs()[name]
    for key, value in changes.items():
        setattr(config, key, value)
    config.save_pretrained(directory)
    data = json.loads((directory / "config.json").read_text())
    for key in drop:
        data.pop(key, None)
    (directory / "config.json").write_text(json.dumps(data))
    return directory


def same_report(directory: Path, **fields) -> None:
    from qlora_plugin.core.fields import recipe_spec
    from qlora_plugin.tools.config_layers import report_from_config
    from qlora_plugin.tools.inspection import analyze_module

    quick = report_from_config(directory, recipe_spec(**fields))
    assert quick is not None
    full = analyze_module(directory, recipe_spec(**fields))
    assert quick.architecture == full.architecture and quick.targets == full.targets
    assert quick.linears == full.linears and quick.other_params == full.other_params
    assert (quick.tied_head, quick.norm_count, quick.heads) == (full.tied_head, full.norm_count, full.heads)
    assert quick.skipped == full.skipped and quick.trainable_params == full.trainable_params


@pytest.mark.parametrize("name", FAMILIES)
def test_a_config_read_without_torch_gives_the_meta_models_report(name, tmp_path) -> None:
    same_report(saved_config(name, tmp_path / "plain"))
    same_report(
        saved_config(name, tmp_path / "variant", tie_word_embeddings=True, attention_bias=True, num_key_value_heads=1),
        exclude_modules=["o_proj"],
    )
    same_report(saved_config(name, tmp_path / "named"), target_modules=["q_proj", "down_proj"])


@pytest.mark.parametrize(
    ("name", "drop"),
    [("llama", ("num_key_value_heads",)), ("qwen3", ("head_dim",)), ("llama", ("tie_word_embeddings",)), ("gpt2", ())],
)
def test_a_config_that_leaves_sizes_to_defaults_goes_through_the_meta_model(name, drop, tmp_path) -> None:
    from qlora_plugin.core.fields import recipe_spec
    from qlora_plugin.tools.config_layers import report_from_config

    assert report_from_config(saved_config(name, tmp_path, drop=drop), recipe_spec()) is None
