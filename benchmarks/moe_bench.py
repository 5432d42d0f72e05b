#!/usr/bin/env python3
"""Issue 27's device row: a Qwen3-30B-A3B-shaped mixture-of-experts model (random init) trained at batch 1 x 2048.

    python benchmarks/moe_bench.py --out DIR [--variants plugin trl-4bit] [--shape 30b-a3b|tiny]
        [--device cuda|cpu] [--steps 3] [--warmup 1] [--deadline S] [--profile]

``BENCH_DEVICE=cpu`` (or ``--device cpu``, with ``--shape tiny``) is the CPU dry run.

Variants, each in a child process of its own (an out-of-memory error ends only that one):

- ``plugin``: the recipe as it is (NF4 + double quant, bf16, r 16 / alpha 32, gradient
  checkpointing, the fused paged AdamW, the fast path on CUDA with its logit-free loss, armed as
  the Axolotl plugin arms it): attention in 4 bits, the fused experts in 4 bits
  (:mod:`qlora_plugin.build.moe_experts`), LoRA on attention and on every expert.
- ``plugin-r8``: the same with r 8 / alpha 16.
- ``plugin-linear``: the recipe with ``lora_on_experts=False`` (experts in 4 bits, LoRA on attention only).
- ``plugin-per-expert``: ``plugin`` with the experts' forward forced to one bitsandbytes 4-bit matmul
  per routed expert (``QuantizedExperts.routing_strategy = "per_expert"``: run 12's forward), against
  the grouped GEMMs ``plugin`` uses at this batch.
- ``trl-4bit``: what TRL's 4-bit path gives a user today: the linear layers in NF4 as a
  ``BitsAndBytesConfig`` load makes them (``bnb.nn.Linear4bit``), the fused experts left in bf16
  (bitsandbytes does not quantize 3-D parameters), ``LoraConfig(target_modules="all-linear", r=16,
  lora_alpha=32, lora_dropout=0)`` (PEFT widens it to the experts and routers through its
  ``ParamWrapper``; with dropout 0.05 PEFT refuses the experts), TRL's non-reentrant gradient
  checkpointing, ``paged_adamw_32bit``, bf16 autocast.

The model is built on the meta device and materialized one decoder layer at a time on the
device, drawn at random (std 0.02, norms 1); the plugin variants store that layer's linear layers
and experts in 4 bits before the next layer exists, so no 16-bit copy of the experts is ever whole.
``trl-4bit`` keeps the experts in bf16, as its load does. Each variant then trains the same
random tokens (seed 0) in a plain loop (forward, backward, clip 0.3, optimizer step), the steps a
trainer makes, without a trainer's own overheads.

Row: variant, ok, error, build_s, model_gib (allocated after building and wrapping), peak_gib
(``torch.cuda.max_memory_allocated`` over the steps, the model included), paged_gib (optimizer
states in CUDA managed memory, outside the allocator), peak_with_paged_gib, step_s (mean of the
timed steps), tok_s, losses, trainable, gpu, versions; plus ``qlora estimate``'s prediction for the
plugin variants. Results: ``moe.json`` and ``moe.md`` in ``--out``, rewritten after each variant.
``--profile``: one more step per variant under ``torch.profiler``; its operators by device time in
``profile-<variant>.txt`` (where the step's time goes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GIB = 1024**3
SHAPES: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-30B-A3B's config.json (48 layers, 128 experts, top-8, expert width 768)
    "30b-a3b": dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
}
SEQ = {"30b-a3b": 2048, "tiny": 64}
VARIANTS = ("plugin", "plugin-r8", "plugin-linear", "plugin-per-expert", "trl-4bit")
DEFAULT_VARIANTS = ("plugin", "trl-4bit")
RECIPES: dict[str, dict[str, Any]] = {
    "plugin": {},
    "plugin-r8": {"r": 8, "lora_alpha": 16},
    "plugin-linear": {"lora_on_experts": False},
    "plugin-per-expert": {},
}
ROUTING = {"plugin-per-expert": "per_expert"}  # QuantizedExperts.routing_strategy where not "auto"
STARTUP_S = {"30b-a3b": 120.0, "tiny": 20.0}  # imports, building, wrapping: below this a variant is skipped


def config_of(shape: str) -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**SHAPES[shape])


def materialize(module: Any, device: str, generator: Any) -> None:
    """Give ``module`` (on the meta device) storage on ``device`` and draw it: weights N(0, 0.02), 1-D ones."""
    import torch

    module.to_empty(device=device)
    with torch.no_grad():
        for param in module.parameters(recurse=False):
            if param.dim() == 1:
                param.fill_(1.0 if "norm" in type(module).__name__.lower() else 0.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    for child in module.children():
        materialize(child, device, generator)


def build(shape: str, device: str, recipe: Any, experts_4bit: bool) -> Any:
    """The model, one decoder layer at a time on ``device``; linear layers (but the head) in 4 bits, experts too
    if ``experts_4bit``."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_plugin.build.moe_experts import quantize_module
    from qlora_plugin.build.quantization import quantize_linear

    config = config_of(shape)
    dtype = torch.bfloat16
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    compute = recipe.resolved_compute_dtype(device)
    for layer in model.model.layers:
        materialize(layer, device, generator)
        for name, child in list(layer.named_modules()):
            parent_name, _, leaf = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            if isinstance(child, torch.nn.Linear):
                setattr(parent, leaf, quantize_linear(child, recipe, compute))
            elif experts_4bit and leaf == "experts":
                setattr(parent, leaf, quantize_module(child, recipe))
        if device == "cuda":
            torch.cuda.empty_cache()
    for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
        materialize(module, device, generator)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config, device=device)
    model.is_loaded_in_4bit = True  # as transformers marks a model it loaded in 4 bits (PEFT reads it)
    return model


def measure(
    variant: str, shape: str, device: str, steps: int, warmup: int, profile_to: Path | None = None
) -> dict[str, Any]:
    """Build, wrap and train one variant; the row's numbers (``profile_to``: a file for one profiled step)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qlora_plugin import qlora_recipe
    from qlora_plugin.build.prepare import prepare_for_training

    cuda = device == "cuda"
    row: dict[str, Any] = {"variant": variant, "shape": shape, "device": device, "seq": SEQ[shape], "batch": 1}
    started = time.monotonic()
    plugin = variant.startswith("plugin")
    recipe = qlora_recipe(compute_dtype="bfloat16", **RECIPES.get(variant, {}))
    model = build(shape, device, recipe, experts_4bit=plugin)
    if variant in ROUTING:
        from qlora_plugin.build.moe_experts import is_quantized_experts

        for module in model.modules():
            if is_quantized_experts(module):
                module.routing_strategy = ROUTING[variant]
    row["routing"] = ROUTING.get(variant, "auto") if plugin else "transformers"
    if plugin:
        recipe = recipe.resolve(model)
        model = prepare_for_training(model, recipe)
        model = get_peft_model(model, recipe)
        if cuda:  # the fast path as Axolotl's plugin arms it: this loop reads only the loss (no logits needed)
            from qlora_plugin.fastpath.activation import arm

            arm(model, recipe, own_loss=True)
        optimizer_choice = recipe.optimizer_cls_and_kwargs(None) if cuda else None
    else:
        model.requires_grad_(False)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        optimizer_choice = None
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    row["trainable"] = sum(p.numel() for p in params)
    if optimizer_choice is not None:
        cls, kwargs = optimizer_choice
        optimizer = cls(params, **{"lr": 2e-4, **kwargs})
    else:
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW32bit(params, lr=2e-4)
    row["optimizer"] = type(optimizer).__name__
    row["build_s"] = round(time.monotonic() - started, 1)
    if cuda:
        torch.cuda.synchronize()
        row["model_gib"] = round(torch.cuda.memory_allocated() / GIB, 2)
        torch.cuda.reset_peak_memory_stats()
    generator = torch.Generator().manual_seed(0)
    vocab = SHAPES[shape]["vocab_size"]
    losses, times = [], []

    def train_step() -> float:
        ids = torch.randint(0, vocab, (1, SEQ[shape]), generator=generator).to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return round(float(loss), 4)

    for step in range(warmup + steps):
        begin = time.perf_counter()
        losses.append(train_step())
        if step >= warmup:
            times.append(time.perf_counter() - begin)
    if profile_to is not None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as profiler:
            train_step()
        sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        profile_to.write_text(profiler.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=70))
    row["losses"] = losses
    row["step_s"] = round(sum(times) / len(times), 3)
    row["tok_s"] = round(SEQ[shape] / row["step_s"], 1)
    if cuda:
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        from bench_measure import paged_state_bytes

        paged = paged_state_bytes(optimizer)
        row["paged_gib"] = round(paged / GIB, 2)
        row["peak_with_paged_gib"] = round(row["peak_gib"] + row["paged_gib"], 2)
    from qlora_plugin.core.experts import find_experts

    experts = find_experts(model)
    row["experts"] = {
        "modules": len(experts),
        "in_4bit": sum(m.quantized for m in experts),
        "with_lora": sum(bool(m.adapted) for m in experts),
    }
    row["ok"] = True
    return row


def estimate_row(variant: str, shape: str, directory: Path) -> dict[str, Any]:
    """``qlora estimate``'s prediction for a plugin variant (allocator peak and paged states), from the config."""
    from qlora_plugin import qlora_recipe
    from qlora_plugin.tools.estimate import estimate

    config_dir = directory / f"config-{shape}"
    config_of(shape).save_pretrained(config_dir)
    result = estimate(config_dir, qlora_recipe(compute_dtype="bfloat16", **RECIPES[variant]), SEQ[shape], 1)
    return {
        "estimate_allocator_gib": round(result.allocator_peak / GIB, 2),
        "estimate_paged_gib": round(result.paged_optimizer / GIB, 2),
        "estimate_peak_gib": round(result.peak / GIB, 2),
    }


def environment() -> dict[str, Any]:
    import importlib.metadata

    import torch

    names = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"gpu": gpu, "versions": versions}


def child(args: argparse.Namespace) -> int:
    """One variant in this process: print its row as the last line of stdout."""
    try:
        profile_to = args.out / f"profile-{args.one}.txt" if args.profile else None
        row = measure(args.one, args.shape, args.device, args.steps, args.warmup, profile_to)
    except Exception as error:  # an OOM, or PEFT refusing: the row says which
        row = {"variant": args.one, "ok": False, "error": f"{type(error).__name__}: {str(error)[:400]}"}
        try:
            import torch

            if args.device == "cuda":
                row["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        except Exception:  # pragma: no cover - nothing to add
            pass
    print("ROW " + json.dumps(row | environment()), flush=True)
    return 0


def write(out: Path, rows: list[dict[str, Any]]) -> None:
    (out / "moe.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| variant | ok | model GiB | peak GiB (allocator) | + paged states | step s | tok/s | estimate GiB | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row.get('ok')} | {row.get('model_gib', '-')} | {row.get('peak_gib', '-')} | "
            f"{row.get('peak_with_paged_gib', '-')} | {row.get('step_s', '-')} | {row.get('tok_s', '-')} | "
            f"{row.get('estimate_peak_gib', '-')} | {row.get('error', '')} |"
        )
    (out / "moe.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results/moe")))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=os.environ.get("BENCH_DEVICE"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--deadline", type=float, default=float(os.environ.get("DEADLINE", 530)))
    parser.add_argument("--profile", action="store_true", help="one more step per variant under torch.profiler")
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = args.device or "cuda"
    args.shape = args.shape or ("30b-a3b" if args.device == "cuda" else "tiny")
    if args.one:
        return child(args)
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for variant in args.variants:
        left = args.deadline - (time.monotonic() - started)
        if left < STARTUP_S[args.shape]:
            rows.append({"variant": variant, "ok": False, "error": f"skipped: {left:.0f} s left of the deadline"})
            write(args.out, rows)
            continue
        command = [sys.executable, __file__, "--one", variant, "--shape", args.shape, "--device", args.device]
        command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(args.out)]
        command += ["--profile"] if args.profile else []
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
        log = args.out / f"{variant}.log"
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=left, cwd=REPO)
            log.write_text(done.stdout + done.stderr)
            found = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
            row = json.loads(found[-1]) if found else {"variant": variant, "ok": False, "error": done.stderr[-400:]}
        except subprocess.TimeoutExpired as timeout:
            log.write_text(str(timeout.stdout or "") + str(timeout.stderr or ""))
            row = {"variant": variant, "ok": False, "error": f"timed out after {left:.0f} s"}
        if variant.startswith("plugin"):
            row |= estimate_row(variant, args.shape, args.out)
        rows.append(row)
        write(args.out, rows)
        print(json.dumps(row), flush=True)
    return 0 if all(row.get("ok") for row in rows if not row.get("error", "").startswith("skipped")) else 1


if __name__ == "__main__":
    sys.exit(main())
