"""The ``numerics`` subcommand and its comparison: a recipe against stock QLoRA from the same initial
adapters, dropout off, so that losses and gradients can be compared step by step."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench_config import DEVICE
from bench_models import build, synthetic_batches


def cmd_numerics(a: argparse.Namespace) -> None:
    """N steps of one recipe (dropout 0) from a shared initial adapter state; losses and grads saved."""
    import torch

    variant = a.variant
    model, opt, info = build(a.shape, variant, Path(a.model_dir), dropout=0.0)
    init = Path(a.state_dir) / "init_adapters.pt"
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if init.exists():
        saved = torch.load(init)
        assert saved.keys() == lora.keys()
        for n, p in lora.items():
            p.data.copy_(saved[n])
    else:
        torch.save({n: p.detach().float().cpu() for n, p in lora.items()}, init)
    batches = [b.to(DEVICE) for b in synthetic_batches(a.steps, seed=1)]
    # 1) gradients at a point with non-zero B (at PEFT's init B = 0 and A's gradient is zero).
    g = torch.Generator().manual_seed(5)
    backup = {n: p.detach().clone() for n, p in lora.items()}
    for n, p in lora.items():
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g).mul_(0.01))
    model(input_ids=batches[0], labels=batches[0]).loss.backward()
    torch.save({n: p.grad.detach().float().cpu() for n, p in lora.items()}, Path(a.state_dir) / f"grads_{variant}.pt")
    for n, p in lora.items():
        p.data.copy_(backup[n])
        p.grad = None
    # 2) training losses.
    losses = []
    for x in batches:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    (Path(a.state_dir) / f"losses_{variant}.json").write_text(json.dumps(losses))
    print(variant, "losses", [round(x, 4) for x in losses], flush=True)


def compare_numerics(state_dir: Path, ref: str, other: str, shape: str) -> dict[str, Any]:
    """Loss and gradient differences of ``other`` against ``ref`` from their saved numerics files."""
    import torch

    lr_, lo = (json.loads((state_dir / f"losses_{v}.json").read_text()) for v in (ref, other))
    rel = [abs(b - a) / abs(a) for a, b in zip(lr_, lo, strict=False)]
    gr, go = (torch.load(state_dir / f"grads_{v}.pt") for v in (ref, other))
    errs = {n: float((go[n].double() - gr[n].double()).norm() / gr[n].double().norm().clamp_min(1e-30)) for n in gr}
    cos = {
        n: float(torch.nn.functional.cosine_similarity(go[n].flatten().double(), gr[n].flatten().double(), 0))
        for n in gr
    }
    worst = max(errs, key=errs.get)
    return dict(
        shape=shape,
        reference=ref,
        candidate=other,
        steps=len(lr_),
        loss_ref=lr_,
        loss_candidate=lo,
        max_rel_loss_diff=max(rel),
        all_within_1pct=max(rel) < 0.01,
        grad_rel_err_median=sorted(errs.values())[len(errs) // 2],
        grad_rel_err_max=errs[worst],
        grad_rel_err_worst_param=worst,
        grad_cos_min=min(cos.values()),
        n_grad_tensors=len(errs),
    )
