#!/usr/bin/env python3
"""Held-out headline sentiment: the 4-bit base alone vs. base + QLoRA adapter.

The shipped base is loaded in 4 bits through the recipe (NF4, double quant),
scored on ``test.jsonl``, then wrapped with ``PeftModel.from_pretrained`` and
scored again. Two accuracies per model:

* label scoring (the headline figure): the sum of log-probabilities of each
  label's tokens plus ``</s>`` after the prompt; the most likely of
  ``positive`` / ``negative`` / ``neutral`` is the answer. It always names a
  label, so it measures what the model knows, not whether it keeps the format.
* greedy exact match: the first word of a short greedy continuation must be
  the label. This shows whether the model also answers in the trained format.

Usage, from the repository root after ``axolotl train configs/qlora.yml``::

    python examples/evaluate_headlines.py [--adapter outputs/qlora-default] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BASE = REPO / "examples/assets/tiny-llama"
DEFAULT_ADAPTER = REPO / "outputs/qlora-default"
DEFAULT_TEST = REPO / "examples/assets/headlines/test.jsonl"
LABELS = ("positive", "negative", "neutral")
INSTRUCTION = (
    "Classify the sentiment of this financial news headline. Answer with one word: positive, negative or neutral."
)
# Axolotl's `type: alpaca` prompt for a row with an input.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def alpaca_prompt(headline: str, instruction: str = INSTRUCTION) -> str:
    """The prompt exactly as Axolotl's ``type: alpaca`` builds it at training time."""
    return ALPACA_TEMPLATE.format(instruction=instruction, input=headline)


def read_rows(path: Path) -> list[dict[str, str]]:
    """The examples of a JSON-lines file (``instruction``, ``input``, ``output``)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_adapter(adapter: Path, train_command: str = "make train-tiny") -> None:
    """Exit with a clear message unless ``adapter`` holds a saved PEFT adapter."""
    missing = [name for name in ("adapter_config.json", "adapter_model.safetensors") if not (adapter / name).is_file()]
    if missing:
        sys.exit(
            f"error: {adapter} is not a saved adapter (missing {', '.join(missing)}). Train one first: {train_command}"
        )


def load_base(base: Path = DEFAULT_BASE, compute_dtype: str = "float32") -> tuple[Any, Any]:
    """The tokenizer and the base with its linear layers in 4-bit NF4 (double quant), via the recipe.

    float32 compute, as in ``configs/qlora.yml``: CPUs without bf16 units run bf16 far slower.
    """
    from transformers import AutoTokenizer

    from qlora_plugin import qlora_recipe

    tokenizer = AutoTokenizer.from_pretrained(base)
    recipe = qlora_recipe(compute_dtype=compute_dtype, gradient_checkpointing=False)
    return recipe.load_model(base, device_map="cpu").eval(), tokenizer


def with_adapter(model: Any, adapter: Path, train_command: str = "make train-tiny") -> Any:
    """``model`` wrapped with the saved adapter in ``adapter``."""
    from peft import PeftModel

    check_adapter(adapter, train_command)
    return PeftModel.from_pretrained(model, adapter).eval()


def label_scores(model: Any, tokenizer: Any, prompt: str) -> dict[str, float]:
    """Log-probability of each label (its tokens plus ``</s>``) after ``prompt``; one batched forward."""
    import torch

    prompt_ids = tokenizer(prompt)["input_ids"]
    # The response is tokenized on its own, as Axolotl does, then EOS.
    targets = [tokenizer(label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for label in LABELS]
    width = len(prompt_ids) + max(map(len, targets))
    pad = tokenizer.pad_token_id
    rows = [prompt_ids + t + [pad] * (width - len(prompt_ids) - len(t)) for t in targets]
    mask = [[1] * (len(prompt_ids) + len(t)) + [0] * (width - len(prompt_ids) - len(t)) for t in targets]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(rows), attention_mask=torch.tensor(mask)).logits
    logprobs = logits.float().log_softmax(-1)
    start = len(prompt_ids) - 1  # logits at position p predict token p + 1
    return {
        label: sum(logprobs[i, start + j, token].item() for j, token in enumerate(target))
        for i, (label, target) in enumerate(zip(LABELS, targets, strict=True))
    }


def generate_answer(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 4) -> str:
    """Greedy continuation of ``prompt``, decoded without special tokens."""
    import torch

    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def evaluate(model: Any, tokenizer: Any, rows: list[dict[str, str]], greedy: bool = True) -> dict[str, Any]:
    """Label-scoring accuracy, greedy exact-match accuracy and the predicted label counts."""
    scored = matched = 0
    predicted: Counter[str] = Counter()
    for row in rows:
        prompt = alpaca_prompt(row["input"], row["instruction"])
        scores = label_scores(model, tokenizer, prompt)
        guess = max(scores, key=scores.__getitem__)
        predicted[guess] += 1
        scored += guess == row["output"]
        if greedy:
            words = generate_answer(model, tokenizer, prompt).lower().split()
            matched += bool(words) and words[0].strip(".,!:;") == row["output"]
    result: dict[str, Any] = {"label_scoring": scored / len(rows), "predicted": dict(predicted)}
    if greedy:
        result["greedy_exact"] = matched / len(rows)
    return result


def compare(base: Path, adapter: Path, rows: list[dict[str, str]], greedy: bool = True) -> dict[str, Any]:
    """Evaluate the base alone, then the same base with the adapter."""
    check_adapter(adapter)
    model, tokenizer = load_base(base)
    results = {"n_test": len(rows), "base": evaluate(model, tokenizer, rows, greedy)}
    results["base+adapter"] = evaluate(with_adapter(model, adapter), tokenizer, rows, greedy)
    return results


def table(results: dict[str, Any], rows: list[dict[str, str]]) -> str:
    """The results as a small text table, with the majority-class baseline."""
    counts = Counter(row["output"] for row in rows)
    majority = max(counts.values()) / len(rows)
    lines = [
        f"held-out headlines: {len(rows)} ({', '.join(f'{n} {label}' for label, n in sorted(counts.items()))}); "
        f"majority class {majority:.1%}",
        f"{'model':<14} {'label scoring':>14} {'greedy exact':>13}",
    ]
    for name in ("base", "base+adapter"):
        r = results[name]
        greedy = f"{r['greedy_exact']:.1%}" if "greedy_exact" in r else "-"
        lines.append(f"{name:<14} {r['label_scoring']:>14.1%} {greedy:>13}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE)
    parser.add_argument("--adapter", type=Path, default=DEFAULT_ADAPTER)
    parser.add_argument("--test", type=Path, default=DEFAULT_TEST)
    parser.add_argument("--no-greedy", action="store_true", help="label scoring only (faster)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    rows = read_rows(args.test)
    results = compare(args.base, args.adapter, rows, greedy=not args.no_greedy)
    print(table(results, rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
