"""QLoRA training-step benchmark: stock recipes vs qlora-plugin's fast path, one process per variant.

Subcommands (run on a CUDA machine; see benchmarks/run_device.sh):
  all        make the models, run every requested variant in its own process, run the
             CUDA kernel tests and the numerics comparison, write JSON + markdown
  make-model build a random-init Llama of a given shape, save it bf16 and pre-quantized NF4
  run        one variant on one shape; appends one row to a JSON file
  numerics   one recipe for N steps from a saved initial adapter state; per-step losses + grads
  table      render JSON result files as a markdown table

Models are random-init from Llama-3.2-1B / Llama-3.1-8B shapes (no model hub). Data is
synthetic but learnable (a Zipf unigram mixed with a fixed successor map), so the loss moves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEVICE = "cuda" if os.environ.get("BENCH_DEVICE", "cuda") == "cuda" else "cpu"
BATCH, SEQ = 4, int(os.environ.get("BENCH_SEQ", 2048))
RANK, ALPHA = 16, 32
LR = 2e-4

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=False,
    ),  # CPU dry runs
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
}
VOCAB = 128256

# name -> settings. "recipe": qlora_recipe overrides, run the way a user would (SFTTrainer for the
# table, recipe -> PEFT -> the recipe's hooks for numerics and the memory sweep); "fused_optim":
# pass optimizer_cls_and_kwargs=recipe.optimizer_cls_and_kwargs(args). "plugin": FastPathConfig
# applied directly (the earlier standalone rows, kept for comparison).
VARIANTS: dict[str, dict[str, Any]] = {
    "bf16-lora": dict(quant=False, prepare=False, dropout=0.05, optim="torch-adamw", grad_ckpt=True),
    "stock-qlora": dict(quant=True, prepare=True, dropout=0.05, optim="bnb-paged", grad_ckpt=True),
    "trl-qlora": dict(quant=True, trl=True, dropout=0.05, optim="paged_adamw_32bit", grad_ckpt=True),
    "qlora-plugin": dict(
        quant=True, trl=True, dropout=0.05, recipe=dict(gradient_checkpointing=False), fused_optim=True
    ),
    "qlora-plugin-memory": dict(
        quant=True, trl=True, dropout=0.05, recipe=dict(gradient_checkpointing="offload"), fused_optim=True
    ),
    "qlora-plugin-default": dict(quant=True, trl=True, dropout=0.05, recipe={}, fused_optim=True),
    "qlora-plugin-bnb-optim": dict(
        quant=True, trl=True, dropout=0.05, recipe=dict(gradient_checkpointing=False), fused_optim=False
    ),
    # recipe -> PEFT -> the recipe's hooks, without a trainer (numerics: dropout forced to 0 there)
    "qlora-plugin-numerics": dict(quant=True, dropout=0.0, recipe=dict(gradient_checkpointing=False)),
    "kernels-direct": dict(
        quant=True,
        prepare=False,
        dropout=0.0,
        optim="plugin-paged",
        plugin=dict(recompute="none", cache_block_constants=True),
    ),
}


# ----------------------------------------------------------------------------- helpers


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "liger-kernel", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _empty_cache() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _reset_peak() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak() -> int:
    import torch

    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0


def _gpu() -> str:
    import torch

    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"


class _Events:
    """Paired timing marks: CUDA events on the GPU, perf_counter on a CPU dry run."""

    def __init__(self) -> None:
        self.pairs: list[Any] = []
        self._open: Any = None

    def start(self) -> None:
        self._open = self._mark()

    def stop(self) -> None:
        if self._open is not None:
            self.pairs.append((self._open, self._mark()))
            self._open = None

    @staticmethod
    def _mark() -> Any:
        import torch

        if DEVICE == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def mean_ms(self, skip: int = 0) -> float:
        pairs = self.pairs[skip:] or self.pairs
        if not pairs:
            return 0.0
        if DEVICE == "cuda":
            return sum(s.elapsed_time(e) for s, e in pairs) / len(pairs)
        return 1e3 * sum(e - s for s, e in pairs) / len(pairs)


def _gib(n: float) -> float:
    return round(n / 2**30, 2)


def model_dirs(root: Path, shape: str) -> tuple[Path, Path]:
    return root / f"{shape}-bf16", root / f"{shape}-nf4"


def synthetic_batches(n: int, seed: int = 0, vocab: int = VOCAB) -> list[Any]:
    """``n`` batches [BATCH, SEQ] of token ids: Zipf unigram over 8k ids, half the time the fixed successor."""
    import torch

    g = torch.Generator().manual_seed(seed)
    support = 8192
    probs = 1.0 / torch.arange(1, support + 1, dtype=torch.float64) ** 1.1
    ids = torch.randperm(vocab, generator=g)[:support]
    succ = torch.randperm(support, generator=g)
    out = []
    for _ in range(n):
        draws = torch.multinomial(probs.float(), BATCH * SEQ, replacement=True, generator=g).view(BATCH, SEQ)
        follow = torch.rand(BATCH, SEQ, generator=g) < 0.5
        for t in range(1, SEQ):
            draws[:, t] = torch.where(follow[:, t], succ[draws[:, t - 1]], draws[:, t])
        out.append(ids[draws])
    return out


def llama_config(shape: str) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        attn_implementation="sdpa",
        **SHAPES[shape],
    )


def bnb_config() -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.uint8,
    )


# ----------------------------------------------------------------------------- make-model


def cmd_make_model(a: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    bf16_dir, nf4_dir = model_dirs(Path(a.dir), a.shape)
    t0 = time.time()
    if not (bf16_dir / "config.json").exists():
        torch.manual_seed(1234)
        cfg = llama_config(a.shape)
        with torch.device(DEVICE):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(bf16_dir, max_shard_size="4GB")
        del model
        _empty_cache()
    t1 = time.time()
    if not (nf4_dir / "config.json").exists():
        q = AutoModelForCausalLM.from_pretrained(
            bf16_dir,
            quantization_config=bnb_config(),
            dtype=torch.bfloat16,
            device_map=DEVICE,
            attn_implementation="sdpa",
        )
        q.save_pretrained(nf4_dir)
    print(f"make-model {a.shape}: bf16 {t1 - t0:.0f}s, nf4 {time.time() - t1:.0f}s", flush=True)


# ----------------------------------------------------------------------------- model + optimizer per variant


def build(
    shape: str,
    variant: str,
    model_root: Path,
    *,
    dropout: float | None = None,
    plugin_overrides: dict[str, Any] | None = None,
    optim: str | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """The PEFT model and optimizer of ``variant`` plus a description of what was set."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    spec = dict(VARIANTS[variant])
    if dropout is not None:
        spec["dropout"] = dropout
    if optim is not None:
        spec["optim"] = optim
    bf16_dir, nf4_dir = model_dirs(model_root, shape)
    kw = dict(dtype=torch.bfloat16, device_map=DEVICE, attn_implementation="sdpa")
    if "recipe" in spec:
        return build_recipe(nf4_dir, spec, kw)
    model = AutoModelForCausalLM.from_pretrained(nf4_dir if spec["quant"] else bf16_dir, **kw)
    model.config.use_cache = False
    info: dict[str, Any] = {"lora_dropout": spec["dropout"], "optimizer": spec["optim"]}
    if spec.get("prepare"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec["grad_ckpt"])
    lcfg = LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=spec["dropout"], target_modules="all-linear", task_type="CAUSAL_LM"
    )
    torch.manual_seed(0)
    model = get_peft_model(model, lcfg)
    if "plugin" in spec:
        from qlora_plugin.fastpath.kernels import FastPathConfig, apply_fast_path

        pcfg = FastPathConfig(**{**spec["plugin"], **(plugin_overrides or {})})
        report = apply_fast_path(model, config=pcfg)
        info["plugin"] = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in pcfg.__dict__.items()}
        info["plugin_report"] = report.__dict__
        info["grad_ckpt"] = pcfg.recompute
    else:
        if spec["grad_ckpt"] and not spec.get("prepare"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        info["grad_ckpt"] = "full" if spec["grad_ckpt"] else "none"
    params = [p for p in model.parameters() if p.requires_grad]
    info["adapter_dtype"] = str(params[0].dtype)
    if spec["optim"] == "bnb-paged":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW32bit(params, lr=LR, weight_decay=0.0)
    elif spec["optim"] == "plugin-paged":
        from qlora_plugin.fastpath.kernels import PagedAdamW

        opt = PagedAdamW(params, lr=LR, weight_decay=0.0)
    elif spec["optim"] == "torch-fused":
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)
    else:
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    return model, opt, info


def make_recipe(spec: dict[str, Any]) -> Any:
    from qlora_plugin import qlora_recipe

    return qlora_recipe(r=RANK, lora_alpha=ALPHA, lora_dropout=spec["dropout"], learning_rate=LR, **spec["recipe"])


def build_recipe(nf4_dir: Path, spec: dict[str, Any], kw: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """recipe.load_model -> get_peft_model(model, recipe) -> the recipe's optimizer; the fast path goes
    on by itself at the first training forward (on CUDA)."""
    import torch
    from peft import get_peft_model

    recipe = make_recipe(spec)
    model = recipe.load_model(nf4_dir, **kw)
    torch.manual_seed(0)
    model = get_peft_model(model, recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    chosen = recipe.optimizer_cls_and_kwargs()
    if chosen is not None:
        cls, okw = chosen
        opt = cls(params, **{**okw, "weight_decay": 0.0})
    else:
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW32bit(params, lr=LR, weight_decay=0.0)
    model.train()
    from qlora_plugin.fastpath.activation import recompute_mode

    info = {
        "lora_dropout": spec["dropout"],
        "optimizer": type(opt).__name__,
        "grad_ckpt": recompute_mode(recipe),
        "adapter_dtype": "float32 (after the first forward)",
        "recipe": recipe.recipe_fields(),
    }
    return model, opt, info


# ----------------------------------------------------------------------------- profiling


_GEMM = re.compile(r"gemm|nvjet|cutlass|xmma|sm90_|cublas", re.I)
_FP32_GEMM = re.compile(r"sgemm|f32f32_f32f32|_sss_|nvjet_sm\d+_sss|gemm_f32", re.I)


def kernel_category(name: str) -> str:
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n:
        return "attention"
    if "dequant" in n:
        return "nf4 dequant"
    if "adam" in n or "optimizer" in n:
        return "optimizer"
    if "cross_entropy" in n or "liger_cross" in n or "log_softmax" in n or "nll_loss" in n:
        return "loss"
    if "rms" in n:
        return "rmsnorm"
    if "silu" in n or "swiglu" in n:
        return "silu*mul"
    if _GEMM.search(name):
        return "gemm fp32" if _FP32_GEMM.search(name) else "gemm bf16"
    if "memcpy" in n or "copy" in n:
        return "copy/cast"
    if "reduce" in n or "norm" in n:
        return "reduce"
    if "elementwise" in n or "vectorized" in n:
        return "elementwise"
    return "other"


class MatmulFlops:
    """TorchDispatchMode counting matmul FLOPs per input dtype."""

    def __new__(cls) -> Any:
        from torch.utils._python_dispatch import TorchDispatchMode

        class _Mode(TorchDispatchMode):
            def __init__(self) -> None:
                super().__init__()
                self.flops: dict[str, float] = {}

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                kwargs = kwargs or {}
                name = func.__name__.split(".")[0]
                if name in ("mm", "addmm", "bmm", "baddbmm"):
                    a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
                    f = 2.0 * a.numel() * b.shape[-1]
                    key = str(a.dtype).replace("torch.", "")
                    self.flops[key] = self.flops.get(key, 0.0) + f
                return func(*args, **kwargs)

        return _Mode()


def summarize_profile(prof: Any, trace_path: Path | None) -> dict[str, Any]:
    """GPU time by kernel category and the top kernels of one profiled step; tables to ``trace_path``."""
    import torch

    cats: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            t = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            cats[kernel_category(ev.name)] = cats.get(kernel_category(ev.name), 0.0) + t
            kernels[ev.name] = kernels.get(ev.name, 0.0) + t
    total = sum(cats.values()) or 1.0
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    if trace_path is not None:
        averages = prof.key_averages()
        trace_path.write_text(
            averages.table(sort_by="self_cuda_time_total", row_limit=50)
            + "\n\n"
            + averages.table(sort_by="self_cpu_time_total", row_limit=50)
        )
    return {
        "gpu_ms": round(total / 1e3, 1),
        "kernel_launches": sum(1 for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA),
        "categories_pct": {k: round(100 * v / total, 1) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms": [[k[:90], round(v / 1e3, 2)] for k, v in top],
    }


def profile_step(step_fn: Any, trace_path: Path | None) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step_fn()
        torch.cuda.synchronize()
    result = summarize_profile(prof, trace_path)
    mode = MatmulFlops()
    with mode:
        step_fn()
    torch.cuda.synchronize()
    result["matmul_tflop_by_dtype"] = {k: round(v / 1e12, 2) for k, v in mode.flops.items()}
    return result


# ----------------------------------------------------------------------------- run one variant


def _optimizer_step_timed(opt: Any, events: Any) -> None:
    events.start()
    opt.step()
    events.stop()


def cmd_run(a: argparse.Namespace) -> None:
    import torch

    if VARIANTS[a.variant].get("trl"):
        return run_trl(a)
    overrides = json.loads(a.plugin) if a.plugin else None
    t0 = time.time()
    model, opt, info = build(
        a.shape, a.variant, Path(a.model_dir), plugin_overrides=overrides, optim=a.optim, dropout=a.dropout
    )
    load_s = time.time() - t0
    load_peak = _peak()
    batches = [b.to(DEVICE) for b in synthetic_batches(min(a.warmup + a.steps, 4))]
    _reset_peak()
    losses: list[Any] = []
    opt_events = _Events()

    def step(i: int, timed: bool) -> None:
        x = batches[i % len(batches)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if timed:
            _optimizer_step_timed(opt, opt_events)
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    for i in range(a.warmup):
        step(i, False)
    _sync()
    t1 = time.perf_counter()
    for i in range(a.warmup, a.warmup + a.steps):
        step(i, True)
    _sync()
    elapsed = time.perf_counter() - t1
    peak = _peak()
    peak_reserved = torch.cuda.max_memory_reserved() if DEVICE == "cuda" else 0
    opt_ms = opt_events.mean_ms()
    step_s = elapsed / a.steps
    row = dict(
        shape=a.shape,
        variant=a.tag or a.variant,
        tok_s=round(BATCH * SEQ / step_s),
        step_s=round(step_s, 4),
        peak_gib=_gib(peak),
        peak_reserved_gib=_gib(peak_reserved),
        load_peak_gib=_gib(load_peak),
        loss_first=round(float(losses[0]), 4),
        loss_last=round(float(losses[-1]), 4),
        losses=[round(float(x), 4) for x in losses],
        batch=BATCH,
        seq=SEQ,
        rank=RANK,
        alpha=ALPHA,
        grad_ckpt=info.pop("grad_ckpt"),
        optimizer_ms=round(opt_ms, 2),
        optimizer_pct=round(100 * opt_ms / 1e3 / step_s, 2),
        paged_gib=_gib(opt.paged_bytes()) if hasattr(opt, "paged_bytes") else None,
        warmup=a.warmup,
        steps=a.steps,
        load_s=round(load_s, 1),
        gpu=_gpu(),
        versions=_versions(),
        cuda_graphs=graphs_state(model),
        **info,
    )
    if a.profile:
        row["profile"] = profile_step(lambda: step(0, False), Path(a.profile))
    append_row(Path(a.json), row)
    print(
        json.dumps(
            {
                k: row[k]
                for k in (
                    "shape",
                    "variant",
                    "tok_s",
                    "peak_gib",
                    "loss_first",
                    "loss_last",
                    "optimizer_pct",
                    "cuda_graphs",
                )
            }
        ),
        flush=True,
    )


def run_trl(a: argparse.Namespace) -> None:
    """SFTTrainer over a 4-bit model: TRL's own QLoRA (LoraConfig), or the recipe as a user writes it:
    ``SFTTrainer(model, args=recipe.sft_config(...), peft_config=recipe[, optimizer_cls_and_kwargs=...])``."""
    import logging
    import tempfile

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    spec = dict(VARIANTS[a.variant])
    if a.dropout is not None:
        spec["dropout"] = a.dropout
    if a.recipe and "recipe" in spec:
        spec["recipe"] = {**spec["recipe"], **json.loads(a.recipe)}
    if a.plugin:  # experiment: FastPathConfig fields over what the recipe asks for
        import dataclasses

        from qlora_plugin.fastpath import activation as speed

        asked, overrides = speed.kernel_config, json.loads(a.plugin)
        speed.kernel_config = lambda *args, **kws: dataclasses.replace(asked(*args, **kws), **overrides)
    _, nf4_dir = model_dirs(Path(a.model_dir), a.shape)
    t0 = time.time()
    kw = dict(dtype=torch.bfloat16, device_map=DEVICE, attn_implementation="sdpa")
    recipe = make_recipe(spec) if "recipe" in spec else None
    reports: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            reports.append(record.getMessage())

    logging.getLogger("qlora_plugin").addHandler(Keep())
    logging.getLogger("qlora_plugin").setLevel(logging.INFO)
    if recipe is not None:
        model = recipe.load_model(nf4_dir, **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(nf4_dir, **kw)
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    n = a.warmup + a.steps
    batches = synthetic_batches(min(n, 4))
    rows = [batches[i % len(batches)][j].tolist() for i in range(n) for j in range(BATCH)]
    ds = Dataset.from_dict({"input_ids": rows})
    times: list[float] = []
    logged: list[float] = []
    opt_events = _Events()

    # host-side phases of each step (no extra syncs: a phase that waits on the GPU shows it). With
    # --profile, the GPU is also drained at each step's start and end; otherwise only around the timed
    # steps, so the host may run ahead into the next step as it does in real use.
    step_sync = bool(a.profile)
    profiled_steps = 1 if a.profile else 3  # --timeline: three steps, two full cycles between them
    phases: dict[str, list[float]] = {}
    marks: dict[str, float] = {}
    profiler: list[Any] = []

    def mark(name: str) -> None:
        marks[name] = time.perf_counter()

    def close(name: str, since: str) -> None:
        phases.setdefault(name, []).append(1e3 * (time.perf_counter() - marks[since]))

    class Timer(TrainerCallback):
        def on_train_begin(self, *args: Any, **kw: Any) -> None:
            _reset_peak()

        def on_step_begin(self, args: Any, state: Any, *rest: Any, **kw: Any) -> None:
            if step_sync or state.global_step == a.warmup:
                _sync()
            if (a.profile or a.timeline) and state.global_step == a.warmup:
                from torch.profiler import ProfilerActivity, profile

                profiler.append(profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]))
                profiler[0].__enter__()
            times.append(time.perf_counter())
            mark("step")

        def on_pre_optimizer_step(self, *args: Any, **kw: Any) -> None:
            close("step_to_pre_optimizer", "step")
            mark("pre_opt")
            opt_events.start()

        def on_optimizer_step(self, *args: Any, **kw: Any) -> None:
            opt_events.stop()
            close("optimizer", "pre_opt")
            mark("post_opt")

        def on_step_end(self, args: Any, state: Any, *rest: Any, **kw: Any) -> None:
            close("after_optimizer", "post_opt")
            if step_sync or state.global_step == n:
                _sync()
                close("step_synced", "step")
            times.append(time.perf_counter())
            if profiler and len(profiler) == 1 and state.global_step == a.warmup + profiled_steps:
                profiler[0].__exit__(None, None, None)
                profiler.append(True)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                logged.append(float(logs["loss"]))

    common = dict(
        per_device_train_batch_size=BATCH,
        max_steps=n,
        learning_rate=LR,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=a.logging_steps,
        save_strategy="no",
        report_to="none",
        max_length=SEQ,
        packing=False,
        seed=0,
        dataset_kwargs={"skip_prepare_dataset": True},
        dataloader_num_workers=0,
    )
    common.update(json.loads(a.trainer_args) if a.trainer_args else {})

    class SFTTrainerWithoutMetrics(SFTTrainer):
        """TRL's loss without its per-step metrics (token count, accuracy): no read-backs after the forward."""

        def compute_loss(
            self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            from transformers import Trainer

            inputs["use_cache"] = False
            if self.args.use_liger_kernel:
                inputs["skip_logits"] = self.model.training
            return Trainer.compute_loss(
                self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

    with tempfile.TemporaryDirectory() as out:
        extra: dict[str, Any] = {}
        if recipe is not None:
            cfg = recipe.sft_config(output_dir=out, **common)
            peft_config: Any = recipe
            if spec.get("fused_optim"):
                extra["optimizer_cls_and_kwargs"] = recipe.optimizer_cls_and_kwargs(cfg)
        else:
            cfg = SFTConfig(
                output_dir=out,
                bf16=DEVICE == "cuda",
                gradient_checkpointing=spec["grad_ckpt"],
                optim=spec["optim"],
                **common,
            )
            peft_config = LoraConfig(
                r=RANK,
                lora_alpha=ALPHA,
                lora_dropout=spec["dropout"],
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            )
        trainer_cls = SFTTrainer if a.trl_metrics == "on" else SFTTrainerWithoutMetrics
        if a.profile:

            class PhasedSFTTrainer(trainer_cls):  # type: ignore[valid-type,misc]
                def compute_loss(self, *args: Any, **kws: Any) -> Any:
                    mark("loss")
                    out = super().compute_loss(*args, **kws)
                    close("compute_loss", "loss")
                    return out

            trainer_cls = PhasedSFTTrainer
        trainer = trainer_cls(
            model=model,
            args=cfg,
            train_dataset=ds,
            processing_class=tok,
            peft_config=peft_config,
            callbacks=[Timer()],
            **extra,
        )
        if a.timeline:
            from timeline import annotate_trainer

            annotate_trainer(trainer)
        load_s = time.time() - t0
        trainer.train()
    peak = _peak()
    starts, ends = times[0::2], times[1::2]
    timed = ends[-1] - starts[a.warmup]  # includes data loading and logging between steps, as in real use
    step_s = timed / a.steps
    opt_ms = opt_events.mean_ms(skip=a.warmup)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    adapter_dtype = str(next(p.dtype for p in trainer.model.parameters() if p.requires_grad))
    if recipe is not None:
        from qlora_plugin.fastpath.activation import recompute_mode

        grad_ckpt = recompute_mode(recipe) if DEVICE == "cuda" else str(recipe.gradient_checkpointing)
    else:
        grad_ckpt = "full" if spec["grad_ckpt"] else "none"
    paged = optimizer.paged_bytes() if hasattr(optimizer, "paged_bytes") else None
    row = dict(
        shape=a.shape,
        variant=a.tag or a.variant,
        tok_s=round(BATCH * SEQ / step_s),
        step_s=round(step_s, 4),
        peak_gib=_gib(peak),
        loss_first=round(logged[0], 4) if logged else None,
        loss_last=round(logged[-1], 4) if logged else None,
        losses=[round(x, 4) for x in logged],
        batch=BATCH,
        seq=SEQ,
        rank=RANK,
        alpha=ALPHA,
        grad_ckpt=grad_ckpt,
        optimizer=type(optimizer).__name__,
        optimizer_ms=round(opt_ms, 2),
        optimizer_pct=round(100 * opt_ms / 1e3 / step_s, 2),
        paged_gib=_gib(paged) if paged else None,
        lora_dropout=spec["dropout"],
        adapter_dtype=adapter_dtype,
        warmup=a.warmup,
        steps=a.steps,
        load_s=round(load_s, 1),
        gpu=_gpu(),
        versions=_versions(),
        path="SFTTrainer + recipe" if recipe is not None else "SFTTrainer + LoraConfig",
        plugin_reports=reports,
        logging_steps=a.logging_steps,
        plugin_overrides=a.plugin or None,
        cuda_graphs=graphs_state(trainer.model),
    )
    if phases:
        row["host_phases_ms"] = {
            k: round(sum(v[a.warmup :]) / max(1, len(v[a.warmup :])), 2) for k, v in phases.items()
        }
    if profiler and a.profile:
        row["profile"] = summarize_profile(profiler[0], Path(a.profile))
    if profiler and a.timeline:
        from timeline import gpu_gaps

        trace = Path(a.timeline).with_suffix(".trace.json")
        profiler[0].export_chrome_trace(str(trace))
        row["timeline"] = gpu_gaps(trace)
        Path(a.timeline).write_text(json.dumps(row["timeline"], indent=1))
        trace.unlink()  # tens of MB; the gaps are what is kept
    row["profiled"] = bool(profiler)
    row["trainer_args"] = a.trainer_args or None
    row["trl_metrics"] = a.trl_metrics
    append_row(Path(a.json), row)
    print(
        json.dumps(
            {
                k: row[k]
                for k in (
                    "shape",
                    "variant",
                    "tok_s",
                    "peak_gib",
                    "loss_first",
                    "loss_last",
                    "optimizer_pct",
                    "cuda_graphs",
                )
            }
        ),
        flush=True,
    )


def graphs_state(model: Any) -> dict[str, Any] | None:
    """Whether the decoder layers ran as CUDA graphs: replays, and why not when they did not."""
    for module in model.modules():
        graphs = module.__dict__.get("_qlora_decoder_graphs")
        if graphs is not None:
            return dict(
                captured=graphs.graphed is not None,
                replays=graphs.replays,
                off=graphs.disabled_because,
                eager=graphs.eager_because,
                last_key=str(graphs.last_key),
            )
    return None


def append_row(path: Path, row: dict[str, Any]) -> None:
    rows = json.loads(path.read_text()) if path.exists() else []
    rows.append(row)
    path.write_text(json.dumps(rows, indent=1))


# ----------------------------------------------------------------------------- numerics


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


# ----------------------------------------------------------------------------- memory sweep

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
        _empty_cache()
        _reset_peak()
        for _ in range(3):
            x = torch.randint(0, VOCAB, (batch, seq), generator=g).to(DEVICE)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync()
        if fused_loss is None:  # what the hook actually did
            base = model.get_base_model()
            fused_loss = hasattr(base, "_qlora_fast_orig_forward")
        if hasattr(opt, "paged_bytes"):
            paged = opt.paged_bytes()
        else:
            paged = sum(
                t.numel() * t.element_size()
                for st in opt.state.values()
                for k, t in st.items()
                if torch.is_tensor(t) and getattr(t, "is_paged", False)
            )
        rows.append(
            dict(
                model=SWEEP_NAMES[a.shape],
                path=a.path,
                recompute=recompute,
                fused_loss=bool(fused_loss),
                seq=seq,
                batch=batch,
                peak_allocated_bytes=int(_peak()),
                paged_state_bytes=int(paged),
                loss=round(float(loss), 4),
                gpu=_gpu(),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    out = Path(a.json)
    old = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(old + rows, indent=1))


# ----------------------------------------------------------------------------- micro


def cmd_micro(a: argparse.Namespace) -> None:
    """Per-layer timings at 8B shapes: NF4 dequant (bitsandbytes vs Triton) and one LoRA-over-NF4
    layer forward+backward (PEFT vs the fused function), 8192 tokens, bf16."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model
    from triton.testing import do_bench

    from qlora_plugin.fastpath.kernels import dequant
    from qlora_plugin.fastpath.kernels.lora_linear import LayerOptions, patch_lora_4bit_layers, unpatch_lora_4bit_layers
    from qlora_plugin.fastpath.kernels.triton_nf4 import dequantize_4bit_triton

    rows = []
    for name, (out_f, in_f) in {
        "q_proj": (4096, 4096),
        "kv_proj": (1024, 4096),
        "gate_proj": (14336, 4096),
        "down_proj": (4096, 14336),
    }.items():
        torch.manual_seed(0)
        lin = bnb.nn.Linear4bit(
            in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4"
        )
        lin.weight = bnb.nn.Params4bit(
            torch.randn(out_f, in_f, dtype=torch.bfloat16) / in_f**0.5,
            requires_grad=False,
            compress_statistics=True,
            quant_type="nf4",
            blocksize=64,
        )
        holder = torch.nn.Module()
        holder.lin = lin.cuda()
        q, st = holder.lin.weight, holder.lin.weight.quant_state
        t_bnb = do_bench(lambda: bnb.functional.dequantize_4bit(q, st), return_mode="median")
        buf = torch.empty(out_f, in_f, device="cuda", dtype=torch.bfloat16)
        t_tri = do_bench(lambda: dequantize_4bit_triton(q, st, torch.bfloat16, out=buf), return_mode="median")
        pm = get_peft_model(holder, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["lin"]))
        layer = pm.base_model.model.lin
        for p_ in layer.parameters():
            if p_.requires_grad:
                p_.data = p_.data.float()
                torch.nn.init.normal_(p_, std=0.01)
        x = torch.randn(BATCH * SEQ, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(BATCH * SEQ, out_f, device="cuda", dtype=torch.bfloat16)

        def fwd_bwd() -> None:
            layer(x).backward(g)

        t_peft = do_bench(fwd_bwd, return_mode="median", grad_to_none=[x, *layer.parameters()])
        patch_lora_4bit_layers(pm)
        t_fused = do_bench(fwd_bwd, return_mode="median", grad_to_none=[x, *layer.parameters()])
        unpatch_lora_4bit_layers(pm)
        patch_lora_4bit_layers(pm, options=LayerOptions(dequant=dequant.make_dequantizer(triton=True)))
        t_fused_tri = do_bench(fwd_bwd, return_mode="median", grad_to_none=[x, *layer.parameters()])
        xw = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
        t_gemm = do_bench(lambda: torch.mm(x.detach(), xw.t()), return_mode="median")
        rows.append(
            dict(
                layer=name,
                out_f=out_f,
                in_f=in_f,
                dequant_bnb_ms=round(t_bnb, 4),
                dequant_triton_ms=round(t_tri, 4),
                lora_fwd_bwd_peft_ms=round(t_peft, 3),
                lora_fwd_bwd_fused_ms=round(t_fused, 3),
                lora_fwd_bwd_fused_triton_ms=round(t_fused_tri, 3),
                one_bf16_gemm_ms=round(t_gemm, 3),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    Path(a.json).write_text(json.dumps(rows, indent=1))


# ----------------------------------------------------------------------------- table


COLUMNS = (
    "shape",
    "variant",
    "tok_s",
    "step_s",
    "peak_gib",
    "grad_ckpt",
    "optimizer",
    "optimizer_pct",
    "lora_dropout",
    "adapter_dtype",
    "loss_first",
    "loss_last",
)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    order = {v: i for i, v in enumerate(VARIANTS)}
    for r in sorted(rows, key=lambda r: (r.get("shape", ""), order.get(r.get("variant"), 99), r.get("variant", ""))):
        cells = []
        for c in COLUMNS:
            v = r.get(c, "")
            cells.append(f"{v:,}" if c == "tok_s" and isinstance(v, int) else str(v if v is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cmd_table(a: argparse.Namespace) -> None:
    rows = [r for f in a.files for r in json.loads(Path(f).read_text())]
    print(markdown_table(rows))


# ----------------------------------------------------------------------------- all


def _sub(args: list[str], log: Path, timeout: float) -> int:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    print("+", " ".join(args), flush=True)
    with log.open("a") as fh:
        fh.write(f"\n+ {' '.join(args)}\n")
        fh.flush()
        try:
            return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            fh.write("TIMEOUT\n")
            return 124


def _tail(log: Path, n: int = 15) -> str:
    return "\n".join(log.read_text().splitlines()[-n:])


def cmd_all(a: argparse.Namespace) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    root = Path(a.model_root)
    deadline = time.time() + a.budget_s
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = out / f"bench-{stamp}.json"
    if a.micro:
        rc = _sub(["micro", "--json", str(out / "micro.json")], log, 240)
        print(f"micro rc={rc}\n{_tail(log, 5)}", flush=True)
    for shape in a.shapes.split(","):
        if a.variants or a.numerics or a.sweep:
            rc = _sub(["make-model", "--shape", shape, "--dir", str(root)], log, 600)
            if rc:
                print(f"make-model {shape} failed\n{_tail(log)}", flush=True)
                continue
        for v in [x for x in a.variants.split(";") if x]:
            # entry: [shape/]variant[:{FastPathConfig overrides as JSON}][@tag]
            only, _, rest = v.rpartition("/") if "/" in v.split(":")[0] else ("", "", v)
            if only and only != shape:
                continue
            v = rest
            name, _, extra = v.partition(":")
            plugin, _, tag = extra.partition("@")
            left = deadline - time.time()
            if left < 30:
                print(f"skip {shape}/{v}: budget", flush=True)
                continue
            steps = a.steps_8b if shape == "8b" else a.steps
            slow = name in ("stock-qlora", "bf16-lora") and shape == "8b"
            args = [
                "run",
                "--shape",
                shape,
                "--variant",
                name,
                "--model-dir",
                str(root),
                "--json",
                str(results),
                "--steps",
                str(max(2, steps // 2) if slow else steps),
                "--warmup",
                str(1 if slow else a.warmup),
                "--logging-steps",
                str(a.logging_steps),
            ]
            if plugin:
                args += ["--plugin", plugin]
            if tag:
                args += ["--tag", tag]
            if f"{shape}/{name}" in a.profile.split(","):
                args += ["--profile", str(out / f"profile-{shape}-{tag or name}.txt")]
            rc = _sub(args, log, min(left, 420))
            print(f"  {shape}/{v} rc={rc}\n{_tail(log, 2) if rc == 0 else _tail(log)}", flush=True)
        if shape in a.numerics.split(","):
            sd = out / f"numerics-{shape}"
            sd.mkdir(exist_ok=True)
            for v in ("stock-qlora", "qlora-plugin-numerics"):
                rc = _sub(
                    [
                        "numerics",
                        "--shape",
                        shape,
                        "--variant",
                        v,
                        "--model-dir",
                        str(root),
                        "--state-dir",
                        str(sd),
                        "--steps",
                        str(a.numerics_steps),
                    ],
                    log,
                    max(60, min(deadline - time.time(), 400)),
                )
                print(f"  numerics {shape}/{v} rc={rc}", flush=True)
            try:
                cmp_ = compare_numerics(sd, "stock-qlora", "qlora-plugin-numerics", shape)
                (out / f"numerics-{shape}.json").write_text(json.dumps(cmp_, indent=1))
                print(json.dumps({k: v for k, v in cmp_.items() if not k.startswith("loss_")}), flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"numerics compare failed: {e}", flush=True)
            for f in sd.glob("*.pt"):
                f.unlink()
        if shape in a.sweep.split(","):
            for path in ("fast", "stock"):
                left = deadline - time.time()
                if left < 40:
                    print(f"skip sweep {shape}/{path}: budget", flush=True)
                    continue
                rc = _sub(
                    [
                        "sweep",
                        "--shape",
                        shape,
                        "--path",
                        path,
                        "--model-dir",
                        str(root),
                        "--json",
                        str(out / "memory_sweep.json"),
                    ],
                    log,
                    min(left, 300),
                )
                print(f"  sweep {shape}/{path} rc={rc}\n{_tail(log, 2) if rc == 0 else _tail(log)}", flush=True)
    if a.kernel_tests and deadline - time.time() > 45:
        tests = Path(a.tests_dir) / "test_kernels_cuda.py"
        t = time.time()
        with log.open("a") as fh:
            fh.write("\n+ pytest test_kernels_cuda.py\n")
            fh.flush()
            try:
                rc = subprocess.run(
                    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    timeout=deadline - time.time(),
                ).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        print(f"kernel tests rc={rc} ({time.time() - t:.0f}s)\n{_tail(log, 4)}", flush=True)
    if results.exists():
        table = markdown_table(json.loads(results.read_text()))
        (out / f"bench-{stamp}.md").write_text(table + "\n")
        print(table, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("--shape", choices=SHAPES, required=True)
    m.add_argument("--dir", required=True)
    r = sub.add_parser("run")
    r.add_argument("--shape", choices=SHAPES, required=True)
    r.add_argument("--variant", choices=VARIANTS, required=True)
    r.add_argument("--model-dir", required=True)
    r.add_argument("--json", required=True)
    r.add_argument("--steps", type=int, default=6)
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--plugin", default="", help="JSON overrides of FastPathConfig")
    r.add_argument("--recipe", default="", help="JSON overrides of the recipe (recipe variants)")
    r.add_argument("--optim", default=None)
    r.add_argument("--dropout", type=float, default=None)
    r.add_argument("--logging-steps", type=int, default=10, help="trainer rows; 10 is TRL's default")
    r.add_argument("--tag", default="")
    r.add_argument("--profile", default="")
    r.add_argument("--timeline", default="", help="SFTTrainer rows: GPU idle gaps of 3 profiled steps, to this JSON")
    r.add_argument("--trainer-args", default="", help="JSON overrides of the SFTConfig (SFTTrainer rows)")
    r.add_argument(
        "--trl-metrics",
        choices=("on", "off"),
        default="on",
        help="off: skip TRL's per-step metrics and their read-backs (an experiment, SFTTrainer rows)",
    )
    n = sub.add_parser("numerics")
    n.add_argument("--shape", choices=SHAPES, required=True)
    n.add_argument("--variant", choices=VARIANTS, required=True)
    n.add_argument("--model-dir", required=True)
    n.add_argument("--state-dir", required=True)
    n.add_argument("--steps", type=int, default=30)
    sw = sub.add_parser("sweep")
    sw.add_argument("--shape", choices=SHAPES, required=True)
    sw.add_argument("--path", choices=("stock", "fast"), required=True)
    sw.add_argument("--model-dir", required=True)
    sw.add_argument("--json", required=True)
    sw.add_argument("--max-seq", type=int, default=2048)
    mi = sub.add_parser("micro")
    mi.add_argument("--json", required=True)
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    al = sub.add_parser("all")
    al.add_argument("--out", required=True)
    al.add_argument("--model-root", default="")
    al.add_argument("--shapes", default="1b,8b")
    al.add_argument("--variants", default=";".join(VARIANTS), help="';'-separated entries")
    al.add_argument("--steps", type=int, default=8)
    al.add_argument("--steps-8b", type=int, default=6)
    al.add_argument("--warmup", type=int, default=2)
    al.add_argument("--logging-steps", type=int, default=10, help="trainer rows; 10 is TRL's default")
    al.add_argument("--profile", default="", help="comma list of shape/variant to profile")
    al.add_argument("--numerics", default="", help="comma list of shapes for the 30-step comparison")
    al.add_argument("--numerics-steps", type=int, default=30)
    al.add_argument("--kernel-tests", action="store_true")
    al.add_argument("--sweep", default="", help="comma list of shapes for the memory sweep")
    al.add_argument("--micro", action="store_true")
    al.add_argument("--tests-dir", default=str(HERE.parent / "tests"))
    al.add_argument("--budget-s", type=float, default=540)
    a = p.parse_args()
    if a.cmd == "all" and not a.model_root:
        shm = Path("/dev/shm")
        a.model_root = (
            str(shm / "qlora-models") if shm.exists() and shutil.disk_usage(shm).free > 30e9 else "/tmp/qlora-models"
        )
    {
        "make-model": cmd_make_model,
        "run": cmd_run,
        "micro": cmd_micro,
        "numerics": cmd_numerics,
        "table": cmd_table,
        "all": cmd_all,
        "sweep": cmd_sweep,
    }[a.cmd](a)


if __name__ == "__main__":
    main()
