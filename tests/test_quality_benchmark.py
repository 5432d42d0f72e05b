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
    quality.main(
        [
            "run",
            "--smoke",
            "--cache",
            str(cache),
            "--models",
            "tiny-chat",
            "--tasks",
            "sentiment",
            "--seeds",
            "3",
            "--out",
            str(out),
        ]
    )
    payload = json.loads((out / "quality.json").read_text())
    rows = {row["variant"]: row for row in payload["rows"]}
    assert list(rows) == ["base", *quality.VARIANTS]
    assert {row["base_weights"] for row in rows.values()} >= {"float32", "nf4", "fp4"}
    assert (rows["bf16-lora"]["base_weights"], rows["trl-qlora"]["base_weights"]) == ("float32", "nf4")
    assert (rows["qlora-plugin"]["base_weights"], rows["qlora-plugin-fp4"]["base_weights"]) == ("nf4", "fp4")
    for row in rows.values():
        assert (row["model"], row["task"], row["seed"], row["n_test"]) == ("tiny-chat", "sentiment", 3, 6)
        assert math.isfinite(row["eval_loss"]) and 0.0 <= row["accuracy"] <= 1.0
    assert all(rows[v]["train_loss"] is not None for v in quality.VARIANTS) and "train_loss" not in rows["base"]

    table = (out / "quality.md").read_text()
    for variant in quality.VARIANTS:
        assert f"| {variant} | 1 |" in table
    assert "plugin within 1 % eval loss and 1 point of bf16 LoRA:" in table and "NF4 <= FP4 in eval loss:" in table
    assert "dequantized from 4-bit GGUF" in table


def test_the_report_averages_seeds_and_checks_the_targets(tmp_path) -> None:
    import quality

    def row(variant: str, seed: int, loss: float, acc: float) -> dict:
        return {"model": "m", "task": "t", "variant": variant, "seed": seed, "eval_loss": loss, "accuracy": acc}

    rows = [
        row("bf16-lora", 0, 1.00, 0.80),
        row("bf16-lora", 1, 1.02, 0.82),
        row("qlora-plugin", 0, 1.01, 0.81),
        row("qlora-plugin", 1, 1.02, 0.80),
        row("qlora-plugin-fp4", 0, 1.05, 0.78),
        row("qlora-plugin-fp4", 1, 1.07, 0.76),
    ]
    stats = quality.summary(rows)
    assert stats[("m", "t", "bf16-lora")]["eval_loss"] == pytest.approx(1.01)
    assert stats[("m", "t", "bf16-lora")]["eval_loss_sd"] == pytest.approx(0.0141421, rel=1e-4)
    assert quality.targets(stats, "m", "t") == [
        "- plugin within 1 % eval loss and 1 point of bf16 LoRA: yes (+0.50 %, -0.5 pt)",
        "- NF4 <= FP4 in eval loss: yes (1.0150 vs 1.0600)",
    ]
    worse = [r | {"eval_loss": r["eval_loss"] * 1.05} if r["variant"] == "qlora-plugin" else r for r in rows]
    assert quality.targets(quality.summary(worse), "m", "t")[0].startswith(
        "- plugin within 1 % eval loss and 1 point of bf16 LoRA: no (+5.52 %"
    )

    (tmp_path / "quality.json").write_text(
        json.dumps({"settings": {"steps": 2}, "environment": {"device": "x"}, "rows": rows})
    )
    quality.report(tmp_path)
    table = (tmp_path / "quality.md").read_text()
    assert "| qlora-plugin | 2 | 1.0150 ± 0.0071 | +0.50 % | 80.5 % ± 0.7 | -0.5 pt |" in table


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
