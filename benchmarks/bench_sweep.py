"""The ``sweep`` subcommand: peak memory of the stock and fast paths over (sequence, batch) points."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_config import DEVICE, VOCAB
from bench_measure import empty_cache, gpu_name, paged_state_bytes, peak_allocated, reset_peak, sync
from bench_models import build, build_recipe, model_dirs

SWEEP_POINTS = ((1024, 1), (1024, 4), (2048, 1), (2048, 4))
SWEEP_NAMES = {"1b": "llama-3.2-1b", "8b": "llama-3.1-8b", "tiny": "tiny"}


def cmd_sweep(a: argparse.Namespace) -> None:
    """Peak allocated memory over 3 steps at each (seq, batch), one model load per (shape, path).

    path "stock": prepare_model_for_kbit_training (HF gradient checkpointing on), PEFT LoRA, bitsandbytes
    PagedAdamW32bit; path "fast": the recipe's defaults (recipe -> PEFT -> the recipe's own hooks)."""
    import torch

    if a.path == "stock":
        model, opt, info = build(a.shape, "stock-qlora", Path(a.model_dir))
        recompute, fused_loss = "full", False
    else:
        spec = dict(quant=True, dropout=0.05, recipe={})
        model, opt, info = build_recipe(
            model_dirs(Path(a.model_dir), a.shape)[1],
            spec,
            dict(dtype=torch.bfloat16, device_map=DEVICE, attn_implementation="sdpa"),
        )
        recompute, fused_loss = info["grad_ckpt"], None
    g = torch.Generator().manual_seed(3)
    rows = []
    for seq, batch in SWEEP_POINTS:
        if seq > a.max_seq:
            continue
        empty_cache()
        reset_peak()
        for _ in range(3):
            x = torch.randint(0, VOCAB, (batch, seq), generator=g).to(DEVICE)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        if fused_loss is None:  # what the hook actually did
            base = model.get_base_model()
            fused_loss = hasattr(base, "_qlora_fast_orig_forward")
        paged = paged_state_bytes(opt)
        rows.append(
            dict(
                model=SWEEP_NAMES[a.shape],
                path=a.path,
                recompute=recompute,
                fused_loss=bool(fused_loss),
                seq=seq,
                batch=batch,
                peak_allocated_bytes=int(peak_allocated()),
                paged_state_bytes=int(paged),
                loss=round(float(loss), 4),
                gpu=gpu_name(),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    out = Path(a.json)
    old = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(old + rows, indent=1))
