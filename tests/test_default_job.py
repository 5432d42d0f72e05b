"""The embedded tiny job (`make train-tiny`): the real ``axolotl train configs/qlora.yml`` and its examples."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml
from cli_helpers import run_repo_job
from job_output import SUMMARY_LINES, TRAINER_LOG, assert_summary, read_lines, run_job_script

pytest.importorskip("axolotl")
REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs/qlora.yml"
sys.path.insert(0, str(REPO / "examples"))
# Keys the plugin owns: a user config that sets them would be doing the plugin's job.
PLUGIN_KEYS = {
    "adapter",
    "load_in_4bit",
    "load_in_8bit",
    "bnb_config_kwargs",
    "optimizer",
    "bf16",
    "fp16",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "lora_target_linear",
    "lora_qkv_kernel",
    "lora_o_kernel",
    "lora_mlp_kernel",
    "lora_embedding_kernel",
    "learning_rate",
    "num_epochs",
    "micro_batch_size",
    "gradient_checkpointing",
}
LOGGED_LOSS = re.compile(r"\{'loss': '?([-+0-9.eE]+)'?")


def test_the_default_config_leaves_qlora_to_the_plugin() -> None:
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    assert config["plugins"] == ["qlora_plugin.axolotl.QLoRAPlugin"]
    assert isinstance(config["qlora"], dict) and config["qlora"]
    assert PLUGIN_KEYS.isdisjoint(config), sorted(PLUGIN_KEYS & set(config))
    for path in [config["base_model"], *(d["path"] for d in config["datasets"])]:
        assert not Path(path).is_absolute() and (REPO / path).exists(), path


@pytest.fixture
def one_torch_thread():
    """The tiny model's many small ops run faster on one thread, and never stall on a busy CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[Path, str]:
    """Run ``axolotl train configs/qlora.yml`` from the repository root, output redirected; (output dir, log)."""
    out = tmp_path_factory.mktemp("default-job")
    done = run_repo_job("configs/qlora.yml", out, timeout=900)
    (out / "train.log").write_text(done.stdout, encoding="utf-8")
    assert done.returncode == 0, done.stdout[-4000:]
    return out / "adapter", done.stdout


@pytest.fixture(scope="module")
def make_train_tiny(tmp_path_factory) -> tuple[Path, list[str]]:
    """``make train-tiny``'s command, output redirected: (output dir, the lines a person reads)."""
    out = tmp_path_factory.mktemp("make-train-tiny")
    done = run_job_script("tiny", out, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:]
    return out / "adapter", read_lines(done.stdout)


@pytest.mark.slow
def test_make_train_tiny_ends_with_the_result_and_what_to_run_next(make_train_tiny) -> None:
    adapter, lines = make_train_tiny
    before, after = assert_summary(lines, adapter, ask="examples/generate.py")
    assert before < 0.5 and after > 0.85, lines[-6:]


@pytest.mark.slow
def test_make_train_tiny_prints_at_most_20_lines_besides_progress_bars_and_the_summary(make_train_tiny) -> None:
    """Axolotl's config and notes go to the debug log, the module list to qlora_expanded.yml, and the
    third-party warnings every CPU run raises are dropped where they are raised."""
    adapter, lines = make_train_tiny
    others = [line for line in lines[:-SUMMARY_LINES] if not TRAINER_LOG.match(line)]
    # the default job's 30 steps log 6 losses and the final figures: 7 lines, so 13 are left of its 20
    assert len(others) <= 20 - 7, "\n".join(others)
    assert all(len(line) < 400 for line in lines), max(lines, key=len)
    assert not [line for line in lines if "WARNING" in line or "Warning" in line], lines
    log = (adapter / "debug.log").read_text(encoding="utf-8")
    assert '"lora_target_modules": [' in log  # the config, in the file the first line names
    assert any("lora_target_modules in " in line for line in lines)


@pytest.mark.slow
def test_the_default_job_writes_an_adapter_and_a_plugin_free_config(default_run) -> None:
    adapter, _ = default_run
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    expanded = yaml.safe_load((adapter / "qlora_expanded.yml").read_text(encoding="utf-8"))
    assert (expanded["adapter"], expanded["load_in_4bit"]) == ("qlora", True)
    assert expanded["optimizer"] == "paged_adamw_32bit"
    assert expanded["bnb_config_kwargs"]["bnb_4bit_quant_type"] == "nf4"
    assert expanded["bnb_config_kwargs"]["bnb_4bit_use_double_quant"] is True
    blocks = 4  # the shipped base's layers; 7 linear layers in each
    assert len(expanded["lora_target_modules"]) == 7 * blocks
    assert all(name.startswith("model.layers.") for name in expanded["lora_target_modules"])
    assert "qlora" not in expanded and "plugins" not in expanded


@pytest.mark.slow
def test_the_default_job_loss_falls(default_run) -> None:
    _, log = default_run
    losses = [float(value) for value in LOGGED_LOSS.findall(log)]
    assert len(losses) >= 10, log[-2000:]
    assert sum(losses[-3:]) / 3 < 0.1 * losses[0], losses


@pytest.mark.slow
def test_the_adapter_clearly_beats_the_base_on_held_out_headlines(default_run, one_torch_thread) -> None:
    import evaluate_headlines as ev

    adapter, _ = default_run
    rows = ev.read_rows(ev.DEFAULT_TEST)
    results = ev.compare(ev.DEFAULT_BASE, adapter, rows, greedy=False)
    base, tuned = results["base"]["label_scoring"], results["base+adapter"]["label_scoring"]
    assert base < 0.5, results  # three balanced labels: chance is 1/3
    assert tuned > 0.85, results


@pytest.mark.slow
def test_generate_answers_with_the_label(default_run, capsys, one_torch_thread) -> None:
    import evaluate_headlines as ev
    import generate

    adapter, _ = default_run
    rows = ev.read_rows(ev.DEFAULT_TEST)[:6]
    answers = generate.main(["--adapter", str(adapter), "--max-new-tokens", "3", *(row["input"] for row in rows)])
    hits = sum(answer.split()[0] == row["output"] for answer, row in zip(answers, rows, strict=False) if answer.split())
    assert hits >= 5, (answers, [row["output"] for row in rows])
    assert rows[0]["input"] in capsys.readouterr().out


@pytest.mark.slow
def test_the_readme_examples_answer_as_shown(default_run, one_torch_thread) -> None:
    """Every ``examples/generate.py "..."  # -> label`` line of the README, run against the trained adapter."""
    import generate
    from readme import shown_examples

    adapter, _ = default_run
    examples = shown_examples("generate.py")
    assert len(examples) >= 3, "README shows no generate.py examples with their answers"
    for arguments, shown in examples:
        (answer,) = generate.main(["--adapter", str(adapter), *arguments])
        assert answer.split()[0] == shown, (arguments, answer)


def test_evaluate_refuses_a_directory_without_an_adapter(tmp_path) -> None:
    import evaluate_headlines as ev

    with pytest.raises(SystemExit) as stop:
        ev.main(["--adapter", str(tmp_path)])
    assert "not a saved adapter" in str(stop.value) and "adapter_config.json" in str(stop.value)


@pytest.mark.slow
def test_the_trl_example_trains_an_adapter_that_reloads(tmp_path, one_torch_thread) -> None:
    import evaluate_headlines as ev
    import torch
    import trl_sft

    out = trl_sft.main(["--output-dir", str(tmp_path / "trl"), "--max-steps", "8"])
    model, tokenizer = ev.load_base()
    tuned = ev.with_adapter(model, out)
    batch = tokenizer([ev.alpaca_prompt("Foxley Mining shares plunge 12% as orders dry up")], return_tensors="pt")
    with torch.no_grad():
        with_adapter = tuned(**batch).logits
        with tuned.disable_adapter():
            without = tuned(**batch).logits
    assert (with_adapter - without).abs().max() > 1e-3  # trained LoRA weights, not the zero init
