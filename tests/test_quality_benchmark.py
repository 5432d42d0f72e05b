"""benchmarks/quality.py end to end on a CPU (``--smoke``): a tiny Llama with a chat template, every variant."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "scripts"))
LABELS = ("positive", "negative", "neutral")
WORDS = {"positive": "warm bright happy", "negative": "cold broken sad", "neutral": "the table by the door"}
# Role, text and answer on their own lines: a word-level tokenizer splits the prompt where the answer starts.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def tiny_cache(root: Path) -> Path:
    """A prepared-cache layout: ``tiny-chat`` (model + tokenizer with a chat template) and ``sentiment/``."""
    from prepare_real_job import chat_row, write_jsonl
    from tiny import tiny_llama, train_tokenizer

    rows = [chat_row("Sentiment ?", f"{WORDS[label]} {i}", label) for i in range(12) for label in LABELS]
    words = [f"{m['role']} : {m['content']}" for row in rows for m in row["messages"]]
    model_dir = root / "tiny-chat"
    tokenizer = train_tokenizer(model_dir, words + ["assistant :"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    tiny_llama(model_dir, vocab_size=len(tokenizer))
    (root / "sentiment").mkdir()
    write_jsonl(root / "sentiment" / "train.jsonl", rows[:30])
    write_jsonl(root / "sentiment" / "test.jsonl", rows[30:])
    return root


@pytest.mark.slow
def test_every_variant_trains_and_is_reported(tmp_path, capsys) -> None:
    import quality

    cache = tiny_cache(tmp_path / "cache")
    out = tmp_path / "out"
    args = ["run", "--smoke", "--cache", str(cache), "--models", "tiny-chat", "--tasks", "sentiment"]
    quality.main([*args, "--variants", *quality.VARIANTS, "--seeds", "3", "--keep", "2", "--out", str(out)])
    payload = json.loads((out / "quality.json").read_text())
    rows = {row["variant"]: row for row in payload["rows"]}
    assert list(rows) == ["base", *quality.VARIANTS] and not any("error" in row for row in rows.values())
    assert (rows["bf16-lora"]["base_weights"], rows["trl-qlora"]["base_weights"]) == ("float32", "nf4")
    assert (rows["qlora-plugin"]["base_weights"], rows["qlora-plugin-fp4"]["base_weights"]) == ("nf4", "fp4")
    candidates = ("qlora-plugin-bs32", "qlora-plugin-loftq", "qlora-plugin-keep", "qlora-plugin-keepv")
    assert {rows[v]["base_weights"] for v in candidates} == {"nf4"}
    kept = payload["keep_layers"]["tiny-chat/sentiment"]
    assert len(kept) == 2 and rows["qlora-plugin-keep"]["unquantized_modules"] == kept
    for row in rows.values():
        assert (row["model"], row["task"], row["seed"], row["n_test"]) == ("tiny-chat", "sentiment", 3, 6)
        assert math.isfinite(row["eval_loss"]) and 0.0 <= row["accuracy"] <= 1.0
    assert all(rows[v]["train_loss"] is not None for v in quality.VARIANTS) and "train_loss" not in rows["base"]
    assert all(math.isfinite(row["label_loss"]) for row in rows.values())  # the loss taken apart (item 4)
    for variant in quality.VARIANTS:  # the merge check: every plugin variant, on its first seed
        assert ("merged_accuracy" in rows[variant]) == (variant in quality.PLUGIN_FIELDS), variant
    # the merged model answers as the adapter on its 4-bit base does (float32 on a CPU: the same answers)
    assert all(rows[v]["merged_accuracy"] == rows[v]["accuracy"] for v in quality.PLUGIN_FIELDS)

    table = (out / "quality.md").read_text()
    for variant in quality.VARIANTS:
        assert f"| {variant} | 1 |" in table
    assert "- qlora-plugin: eval loss within 1 % of bf16 LoRA or its interval contains 0:" in table
    assert f"- merged model against the adapter on its 4-bit base ({len(quality.PLUGIN_FIELDS)} runs)" in table
    assert "saved in float32" not in table  # a CPU merge is float32 already: no second check
    assert "- answer-token loss taken apart, label tokens / closing tokens: bf16-lora " in table
    assert "dequantized from 4-bit GGUF" in table


@pytest.mark.slow
def test_runs_side_by_side_stop_at_the_budget_and_stay_paired(tmp_path) -> None:
    import quality

    cache = tiny_cache(tmp_path / "cache")
    out = tmp_path / "out"
    args = ["run", "--smoke", "--cache", str(cache), "--models", "tiny-chat", "--tasks", "sentiment"]
    variants = ["--variants", "bf16-lora", "qlora-plugin", "--merge-seeds", "0"]
    quality.main([*args, *variants, "--seeds", "0", "1", "--parallel", "2", "--out", str(out)])
    payload = json.loads((out / "quality.json").read_text())
    done = sorted((r["variant"], r["seed"]) for r in payload["rows"])
    assert done == [("base", 0), ("bf16-lora", 0), ("bf16-lora", 1), ("qlora-plugin", 0), ("qlora-plugin", 1)]
    assert payload["parallel"] == 2 and "| qlora-plugin | 2 |" in (out / "quality.md").read_text()

    quality.main([*args, "--variants", "bf16-lora", "--seeds", "0", "1", "2", "--budget", "1", "--out", str(out)])
    assert len(json.loads((out / "quality.json").read_text())["rows"]) < 4  # no run starts past the budget


def test_the_report_pairs_seeds_gives_intervals_and_checks_the_targets(tmp_path) -> None:
    import quality

    def row(variant: str, seed: int, loss: float, acc: float, **extra) -> dict:
        return {"model": "m", "task": "t", "variant": variant, "seed": seed, "eval_loss": loss, "accuracy": acc} | extra

    bf16 = [1.00, 1.02, 0.98, 1.01]
    rows = [row("bf16-lora", s, loss, 0.80) for s, loss in enumerate(bf16)]
    for s, loss in enumerate(bf16):
        merged = {"merged_accuracy": 0.785, "merged_fp32_accuracy": (0.79, 0.77, 0.79, 0.79)[s]}
        rows.append(row("qlora-plugin", s, loss * (1.04, 1.05, 1.03, 1.04)[s], 0.79, **merged))
        rows.append(row("qlora-plugin-loftq", s, loss * (1.02, 0.99, 1.00, 0.995)[s], 0.80))
    rows += [
        row("qlora-plugin-bs32", 9, 1.0, 0.8),
        {"model": "m", "task": "t", "variant": "x", "seed": 0, "error": "E"},
    ]
    diff = quality.paired(rows, "m", "t", "qlora-plugin", "bf16-lora")
    assert diff["seeds"] == [0, 1, 2, 3] and diff["loss_pct"]["mean"] == pytest.approx(4.0)
    # sd of (4, 5, 3, 4) is 0.8165; t(3) = 3.182: half-width 3.182 * 0.8165 / 2 = 1.299
    assert diff["loss_pct"]["low"] == pytest.approx(4.0 - 1.299, abs=1e-3)
    assert quality.describe(diff["loss_pct"], "%") == "+4.00 % [+2.70, +5.30]*"
    assert quality.paired(rows, "m", "t", "qlora-plugin-bs32", "bf16-lora") is None  # no seed in common
    assert not quality.meets_target(diff)
    assert quality.meets_target(quality.paired(rows, "m", "t", "qlora-plugin-loftq", "bf16-lora"))
    one_seed = [r for r in rows if r["seed"] == 0]  # no interval: the mean alone decides
    assert not quality.meets_target(quality.paired(one_seed, "m", "t", "qlora-plugin", "bf16-lora"))

    (tmp_path / "quality.json").write_text(
        json.dumps({"settings": {"steps": 2}, "environment": {"device": "x"}, "rows": rows})
    )
    quality.report(tmp_path)
    table = (tmp_path / "quality.md").read_text()
    line = "| qlora-plugin | 4 | 1.0427 ± 0.0257 | +4.00 % [+2.70, +5.30]* | 79.0 % ± 0.0 | -1.00 pt [-1.00, -1.00]* |"
    assert line in table
    assert "- qlora-plugin: eval loss within 1 % of bf16 LoRA or its interval contains 0: no (+4.00 %" in table
    assert "- qlora-plugin-loftq: eval loss within 1 % of bf16 LoRA or its interval contains 0: yes" in table
    assert "accuracy -0.50 pt on average, at most 0.50 pt apart: within 1 point" in table
    assert "saved in float32 (4 runs): accuracy -0.50 pt on average, at most 2.00 pt apart: not within" in table
    assert "Failed runs: 1 (t/x/0: E)" in table


@pytest.mark.slow
def test_quant_error_compares_the_storages_on_a_prepared_cache(tmp_path) -> None:
    import quant_error

    cache = tiny_cache(tmp_path / "cache")
    out = tmp_path / "out"
    quant_error.main(["--cache", str(cache), "--models", "tiny-chat", "--tasks", "sentiment", "--out", str(out)])
    payload = json.loads((out / "quant_error.json").read_text())
    errors = payload["weight_error"]["tiny-chat"]
    # NF4's levels are the quantiles of a normal distribution: on Gaussian weights it must beat FP4
    assert 0 < errors["gaussian"]["nf4"] < errors["gaussian"]["fp4"] < 0.1
    assert 0 < errors["model"]["nf4"] < 0.1 and 0 < errors["model"]["fp4"] < 0.1
    assert [row["storage"] for row in payload["base"]] == list(quant_error.STORAGES)
    for row in payload["base"]:
        assert math.isfinite(row["eval_loss"]) and 0.0 <= row["accuracy"] <= 1.0 and row["n_test"] == 6
    assert "| tiny-chat | sentiment | nf4 |" in (out / "quant_error.md").read_text()


def test_quant_error_eval_loss_is_the_mean_over_answer_tokens(tmp_path) -> None:
    """Padded batches give the token-weighted mean of each row's own loss (the trainers' eval loss)."""
    import torch
    from datasets import Dataset
    from quant_error import eval_loss
    from tiny import tiny_llama
    from transformers import AutoModelForCausalLM

    tiny_llama(tmp_path / "m", vocab_size=40)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    rows = {
        "input_ids": [[1, 5, 6, 7, 8, 9], [1, 11, 12], [1, 3, 4, 20, 21]],
        "labels": [[-100, -100, -100, 7, 8, 9], [-100, -100, 12], [-100, -100, -100, -100, 21]],
    }
    expected_sum = expected_count = 0.0
    for ids, labels in zip(rows["input_ids"], rows["labels"], strict=True):
        answer = sum(label != -100 for label in labels[1:])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
        expected_sum += loss * answer
        expected_count += answer
    assert eval_loss(model, Dataset.from_dict(rows), pad_id=0, batch_size=2) == pytest.approx(
        expected_sum / expected_count, rel=1e-5
    )


def test_runs_of_other_seeds_join_into_one_report(tmp_path) -> None:
    import quality

    def run(folder: str, seeds: list[int], settings: dict) -> Path:
        rows = [
            {"model": "m", "task": "t", "variant": v, "seed": s, "eval_loss": 1.0 + s / 100, "accuracy": 0.5}
            for s in seeds
            for v in ("bf16-lora", "qlora-plugin")
        ]
        (tmp_path / folder).mkdir()
        payload = {"settings": settings, "environment": {"device": "x"}, "rows": rows}
        (tmp_path / folder / "quality.json").write_text(json.dumps(payload))
        return tmp_path / folder

    first, second = run("a", [0, 1], {"steps": 2}), run("b", [1, 2], {"steps": 2})
    quality.main(["report", str(tmp_path / "joined"), "--join", str(first), str(second)])
    rows = json.loads((tmp_path / "joined" / "quality.json").read_text())["rows"]
    assert sorted((r["variant"], r["seed"]) for r in rows) == sorted(
        (v, s) for s in (0, 1, 2) for v in ("bf16-lora", "qlora-plugin")
    )
    assert "| qlora-plugin | 3 |" in (tmp_path / "joined" / "quality.md").read_text()
    other = run("c", [5], {"steps": 3})
    with pytest.raises(SystemExit, match="other settings"):
        quality.main(["report", str(tmp_path / "j2"), "--join", str(first), str(other)])
