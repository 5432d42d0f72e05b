#!/usr/bin/env python3
"""Which layers suffer most from 4 bits, and what each quality option buys back, before training (CPU).

Issue 28 asks for a recipe option that closes QLoRA's gap to bf16 LoRA. This measures the
candidates where it is cheap, on the held-out text of the real job (``quality.py``'s tasks):

* per layer, the relative output error ``||X (W - W_q)^T||^2 / ||X W^T||^2`` over the held-out
  rows' tokens ``X`` (each linear layer's own inputs in the 16-bit model) for NF4 at block size 64
  (the default), NF4 at 32, FP4 at 64, and NF4 at 64 with a LoftQ start (the rank-r SVD of
  ``W - W_q`` added back): the ranking says which layers ``unquantized_modules`` should keep;
* end to end (``--end-to-end``), the untrained model through the real recipe (``recipe.load_model``
  and PEFT's layers, float32 compute) for the default NF4 and each option: the KL divergence from
  the 16-bit model's next-token distributions over the held-out rows, and the answer-token eval loss.

Inputs from ``scripts/prepare_real_job.py``. Writes ``sensitivity.json`` and ``sensitivity.md``.

    python benchmarks/sensitivity.py --out benchmarks/results/cpu-sensitivity --end-to-end
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import REPO, Settings, load_task  # noqa: E402

CONFIGS = {"nf4": ("nf4", 64, False), "nf4-bs32": ("nf4", 32, False), "fp4": ("fp4", 64, False)}
LOFTQ = "nf4-loftq"


def error_matrices(weight: Any, rank: int) -> dict[str, Any]:
    """``W - W_q`` (float32, out x in) for each configuration, and for NF4 with a rank-``rank`` LoftQ start."""
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    errors = {}
    for name, (quant_type, blocksize, _) in CONFIGS.items():
        packed, state = quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
        errors[name] = weight.float() - dequantize_4bit(packed, state).float()
    u, s, vh = torch.linalg.svd(errors["nf4"], full_matrices=False)
    errors[LOFTQ] = (u[:, rank:] * s[rank:]) @ vh[rank:]
    return errors


def layer_errors(model: Any, batches: list[dict[str, Any]], rank: int) -> list[dict[str, Any]]:
    """Weight and output error of every linear layer but the head, on the layers' own inputs in ``model``."""
    import torch

    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    matrices: dict[str, dict[str, Any]] = {}
    mask: dict[str, Any] = {}
    handles = []
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    for name, module in linears.items():
        weight = module.weight.detach().to(torch.bfloat16)
        matrices[name] = error_matrices(weight, rank)

        def hook(module: Any, inputs: tuple[Any, ...], output: Any, name: str = name) -> None:
            x = inputs[0][mask["valid"]].float()
            y = x @ module.weight.float().t()
            sums[name]["output"] += float((y**2).sum())
            for config, error in matrices[name].items():
                sums[name][config] += float(((x @ error.t()) ** 2).sum())

        handles.append(module.register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        for batch in batches:
            mask["valid"] = batch["attention_mask"].bool()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    rows = []
    for name, module in linears.items():
        weight = module.weight.detach().float()
        energy = float((weight**2).sum())
        parts = name.split(".")
        index = next((int(p) for p in parts if p.isdigit()), -1)
        row: dict[str, Any] = {"layer": name, "kind": parts[-1], "index": index, "params": weight.numel()}
        for config, error in matrices[name].items():
            row[f"weight_{config}"] = float((error**2).sum()) / energy
            row[f"output_{config}"] = sums[name][config] / sums[name]["output"]
        rows.append(row)
    return rows


def batches_of(task: Any, pad_id: int, size: int, limit: int) -> list[dict[str, Any]]:
    """The held-out rows' full token sequences (prompt and answer), padded, ``size`` rows a batch."""
    import torch

    rows = task.test["input_ids"][:limit]
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        attention = torch.zeros_like(ids)
        for i, r in enumerate(chunk):
            ids[i, : len(r)] = torch.tensor(r)
            attention[i, : len(r)] = 1
        out.append({"input_ids": ids, "attention_mask": attention})
    return out


def log_probs(model: Any, batches: list[dict[str, Any]]) -> list[Any]:
    """Next-token log-probabilities (float32) of ``model`` on each batch."""
    import torch

    model.eval()
    with torch.no_grad():
        return [torch.log_softmax(model(**batch).logits.float(), dim=-1) for batch in batches]


def end_to_end(
    model_dir: Path,
    task: Any,
    pad_id: int,
    batches: list[dict[str, Any]],
    variants: dict[str, Any],
    only: list[str] | None = None,
    earlier: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The untrained model through the recipe's real layers (float32 compute), per variant.

    Two figures: the mean KL divergence from the 16-bit model's next-token distribution over every
    token of the held-out rows (how far 4 bits moved the model: 0 is the 16-bit model itself), and
    the answer-token eval loss (``quality.py``'s measure, which a perturbation can lower as well
    as raise).
    """
    import torch
    from peft import get_peft_model
    from quant_error import eval_loss
    from transformers import AutoModelForCausalLM

    from qlora_plugin import qlora_recipe

    rows = []
    reference: list[Any] = []
    kept = {r["variant"]: r for r in earlier or [] if r["variant"] not in (only or [])}
    for name, fields in variants.items():
        if only and fields is not None and name not in only:
            if name in kept:
                rows.append(kept[name])  # measured before (--layers-from), on the same rows
            continue
        started = time.perf_counter()
        if fields is None:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        else:
            recipe = qlora_recipe(model=model_dir, compute_dtype="float32", **fields)
            model = get_peft_model(recipe.load_model(model_dir), recipe)
        mine = log_probs(model, batches)
        if fields is None:
            reference = mine
        kl = tokens = 0.0
        for ref, got, batch in zip(reference, mine, batches, strict=True):
            per_token = (ref.exp() * (ref - got)).sum(-1)
            mask = batch["attention_mask"].bool()
            kl += float(per_token[mask].sum())
            tokens += int(mask.sum())
        rows.append(
            {
                "variant": name,
                "fields": fields,
                "task": task.name,
                "kl": kl / tokens,
                "eval_loss": eval_loss(model, task.test, pad_id, 16),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del model
    return rows


def markdown(payload: dict[str, Any], top: int) -> str:
    layers = payload["layers"]
    configs = [*CONFIGS, LOFTQ]
    total = sum(r["params"] for r in layers)

    def weighted(key: str, rows: list[dict[str, Any]]) -> float:
        return sum(r[key] * r["params"] for r in rows) / sum(r["params"] for r in rows)

    lines = [
        "# Quantization sensitivity per layer, and the quality options before training",
        "",
        f"Model: {payload['model']}; held-out text: {payload['rows']} rows of {payload['task']} "
        f"({payload['tokens']} tokens); machine: {payload['environment']['machine']}; bitsandbytes "
        f"{payload['environment']['bitsandbytes']}; LoftQ rank {payload['rank']}.",
        "Output error: ||X (W - W_q)^T||^2 / ||X W^T||^2 over each layer's own inputs in the bf16 model; "
        "weight error: ||W - W_q||^2 / ||W||^2. Double quantization throughout.",
        "",
        "## All layers (means weighted by parameters)",
        "",
        "| error | " + " | ".join(configs) + " |",
        "|---|" + "---|" * len(configs),
        "| weight | " + " | ".join(f"{weighted(f'weight_{c}', layers):.5f}" for c in configs) + " |",
        "| output | " + " | ".join(f"{weighted(f'output_{c}', layers):.5f}" for c in configs) + " |",
        "",
        "## By projection (NF4 output error, parameter-weighted)",
        "",
        "| projection | layers | NF4 | NF4 bs32 | FP4 | NF4 + LoftQ |",
        "|---|---|---|---|---|---|",
    ]
    for kind in dict.fromkeys(r["kind"] for r in layers):
        rows = [r for r in layers if r["kind"] == kind]
        lines.append(
            f"| {kind} | {len(rows)} | " + " | ".join(f"{weighted(f'output_{c}', rows):.5f}" for c in configs) + " |"
        )
    ranked = sorted(layers, key=lambda r: r["output_nf4"], reverse=True)
    kept = ranked[:top]
    lines += [
        "",
        f"## The {top} most sensitive layers (NF4 output error)",
        "",
        "| layer | params | NF4 output error | x median | NF4 bs32 | NF4 + LoftQ |",
        "|---|---|---|---|---|---|",
    ]
    median = sorted(r["output_nf4"] for r in layers)[len(layers) // 2]
    for r in kept:
        lines.append(
            f"| {r['layer']} | {r['params']:,} | {r['output_nf4']:.5f} | {r['output_nf4'] / median:.1f} | "
            f"{r['output_nf4-bs32']:.5f} | {r[f'output_{LOFTQ}']:.5f} |"
        )
    share = sum(r["params"] for r in kept) / total
    lines += [
        "",
        f"Keeping these {top} in bf16 (`unquantized_modules`) holds {100 * share:.1f} % of the linear weights in 16 "
        f"instead of about 4.13 bits: {share * (16 - 4.127) / 4.127 * 100:.1f} % more memory for the linear layers' "
        "weights.",
    ]
    kinds = {kind: [r for r in layers if r["kind"] == kind] for kind in dict.fromkeys(r["kind"] for r in layers)}
    worst = max(kinds, key=lambda kind: weighted("output_nf4", kinds[kind]))
    share = sum(r["params"] for r in kinds[worst]) / total
    lines += [
        "",
        f"Keeping every {worst} in bf16 (`unquantized_modules=['{worst}']`, the projection with the largest "
        f"error) holds {100 * share:.1f} % of the linear weights in 16 bits: "
        f"{share * (16 - 4.127) / 4.127 * 100:.1f} % more memory for the linear layers' weights.",
    ]
    if payload.get("end_to_end"):
        reference = next(r["eval_loss"] for r in payload["end_to_end"] if r["fields"] is None)
        nf4 = next(r["kl"] for r in payload["end_to_end"] if r["variant"] == "nf4")
        lines += [
            "",
            "## The untrained model through the recipe (float32 compute)",
            "",
            f"KL: mean over every token of {payload['end_to_end_rows']} held-out rows of KL(16-bit || variant) "
            "of the next-token distribution, in nats; eval loss: the answer tokens of all held-out rows.",
            "",
            "| variant | recipe fields | KL to 16-bit | vs NF4 | answer-token eval loss | vs 16-bit |",
            "|---|---|---|---|---|---|",
        ]
        for r in payload["end_to_end"]:
            base = r["fields"] is None
            shift = "" if base else f"{100 * (r['eval_loss'] / reference - 1):+.2f} %"
            versus = "" if base else f"{100 * (r['kl'] / nf4 - 1):+.1f} %"
            fields = "- (16-bit)" if base else f"`{json.dumps(r['fields'])}`"
            lines.append(f"| {r['variant']} | {fields} | {r['kl']:.4f} | {versus} | {r['eval_loss']:.4f} | {shift} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=REPO / ".cache/qlora-real", help="prepared models and tasks")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="sentiment", help="held-out rows of this task are the text")
    parser.add_argument("--rows", type=int, default=128, help="held-out rows for the per-layer errors")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the LoftQ start")
    parser.add_argument("--top", type=int, default=6, help="layers to keep in 16 bits in the end-to-end variant")
    parser.add_argument("--end-to-end", action="store_true", help="also the untrained model through the recipe")
    parser.add_argument("--e2e-rows", type=int, default=64, help="held-out rows for the end-to-end KL")
    parser.add_argument("--layers-from", type=Path, help="a sensitivity.json whose per-layer errors to reuse")
    parser.add_argument(
        "--e2e-variants", nargs="+", help="measure only these end-to-end variants (others from --layers-from)"
    )
    args = parser.parse_args(argv)

    import bitsandbytes
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = args.cache / args.model
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    task = load_task(tokenizer, args.cache / args.task, Settings())
    batches = batches_of(task, pad_id, 16, args.rows)
    started = time.perf_counter()
    reused = json.loads(args.layers_from.read_text(encoding="utf-8")) if args.layers_from else None
    if reused is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        layers = layer_errors(model, batches, args.rank)
        del model
    else:
        layers = reused["layers"]
    payload: dict[str, Any] = {
        "model": args.model,
        "task": args.task,
        "rows": min(args.rows, len(task.test_rows)),
        "tokens": int(sum(int(b["attention_mask"].sum()) for b in batches)),
        "rank": args.rank,
        "environment": {
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
            "torch": torch.__version__,
            "bitsandbytes": bitsandbytes.__version__,
        },
        "layers": layers,
    }
    payload["seconds_layers"] = reused["seconds_layers"] if reused else round(time.perf_counter() - started, 1)
    if args.end_to_end:
        payload["end_to_end_rows"] = min(args.e2e_rows, len(task.test_rows))
        ranked = sorted(payload["layers"], key=lambda r: r["output_nf4"], reverse=True)
        kept = [r["layer"] for r in ranked[: args.top]]
        payload["end_to_end"] = end_to_end(
            model_dir,
            task,
            pad_id,
            batches_of(task, pad_id, 16, args.e2e_rows),
            {
                "16-bit": None,
                "nf4": {},
                "fp4": {"quant_type": "fp4"},
                "nf4-bs32": {"blocksize": 32},
                "nf4-loftq": {"adapter_init": "loftq", "r": args.rank},
                f"nf4-keep{args.top}": {"unquantized_modules": kept},
                "nf4-keepv": {"unquantized_modules": ["v_proj"]},
                "nf4-loftq-bs32": {"adapter_init": "loftq", "r": args.rank, "blocksize": 32},
                "nf4-loftq-keepv": {"adapter_init": "loftq", "r": args.rank, "unquantized_modules": ["v_proj"]},
            },
            args.e2e_variants,
            reused.get("end_to_end") if reused else None,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sensitivity.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    (args.out / "sensitivity.md").write_text(markdown(payload, args.top), encoding="utf-8")
    print(markdown(payload, args.top))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
