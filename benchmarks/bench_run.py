"""The ``run`` subcommand: one variant on one shape, timed over ``--steps`` after ``--warmup``.

Variants marked ``trl`` go through TRL's SFTTrainer the way a user runs them; the others train in a
plain loop over the model and optimizer that ``bench_models.build`` returns.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench_config import ALPHA, BATCH, DEVICE, LR, RANK, SEQ, VARIANTS
from bench_measure import (
    Events,
    TokenCounter,
    gib,
    gpu_name,
    graphs_state,
    package_versions,
    peak_allocated,
    profile_step,
    reset_peak,
    summarize_profile,
    sync,
)
from bench_models import build, make_recipe, model_dirs, placeholder_tokenizer, synthetic_batches
from bench_results import record_row


def _optimizer_step_timed(opt: Any, events: Any) -> None:
    """One optimizer step between a pair of timing marks."""
    events.start()
    opt.step()
    events.stop()


def cmd_run(a: argparse.Namespace) -> None:
    """One variant on one shape: SFTTrainer rows go to ``run_trl``, others train in a plain loop; appends a row."""
    import torch

    if VARIANTS[a.variant].get("trl") or VARIANTS[a.variant].get("unsloth"):
        return run_trl(a)
    overrides = json.loads(a.plugin) if a.plugin else None
    t0 = time.time()
    model, opt, info = build(
        a.shape, a.variant, Path(a.model_dir), plugin_overrides=overrides, optim=a.optim, dropout=a.dropout
    )
    load_s = time.time() - t0
    load_peak = peak_allocated()
    batches = [b.to(DEVICE) for b in synthetic_batches(min(a.warmup + a.steps, 4))]
    reset_peak()
    losses: list[Any] = []
    opt_events = Events()

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
    sync()
    t1 = time.perf_counter()
    for i in range(a.warmup, a.warmup + a.steps):
        step(i, True)
    sync()
    elapsed = time.perf_counter() - t1
    peak = peak_allocated()
    peak_reserved = torch.cuda.max_memory_reserved() if DEVICE == "cuda" else 0
    opt_ms = opt_events.mean_ms()
    step_s = elapsed / a.steps
    row = dict(
        shape=a.shape,
        variant=a.tag or a.variant,
        tok_s=round(BATCH * SEQ / step_s),
        step_s=round(step_s, 4),
        peak_gib=gib(peak),
        peak_reserved_gib=gib(peak_reserved),
        load_peak_gib=gib(load_peak),
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
        paged_gib=gib(opt.paged_bytes()) if hasattr(opt, "paged_bytes") else None,
        warmup=a.warmup,
        steps=a.steps,
        load_s=round(load_s, 1),
        gpu=gpu_name(),
        versions=package_versions(),
        cuda_graphs=graphs_state(model),
        **info,
    )
    if a.profile:
        row["profile"] = profile_step(lambda: step(0, False), Path(a.profile))
    record_row(Path(a.json), row)


def run_trl(a: argparse.Namespace) -> None:
    """SFTTrainer over a 4-bit model: TRL's own QLoRA (LoraConfig), or the recipe as a user writes it:
    ``SFTTrainer(model, args=recipe.sft_config(...), peft_config=recipe[, optimizer_cls_and_kwargs=...])``."""
    import logging
    import tempfile

    spec = dict(VARIANTS[a.variant])
    if spec.get("unsloth"):
        import unsloth  # noqa: F401  (first: it patches transformers, PEFT and TRL as they are imported)
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

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
    tok = placeholder_tokenizer()
    if spec.get("unsloth"):
        model, tok = unsloth_model(nf4_dir, tok, spec)
    elif recipe is not None:
        model = recipe.load_model(nf4_dir, **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(nf4_dir, **kw)
    n = a.warmup + a.steps
    batches = synthetic_batches(min(n, 4))
    rows = [batches[i % len(batches)][j].tolist() for i in range(n) for j in range(BATCH)]
    ds = Dataset.from_dict({"input_ids": rows})
    times: list[float] = []
    logged: list[float] = []
    opt_events = Events()
    counters: list[TokenCounter] = []

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
            reset_peak()

        def on_step_begin(self, args: Any, state: Any, *rest: Any, **kw: Any) -> None:
            if step_sync or state.global_step == a.warmup:
                sync()
            if state.global_step == a.warmup and counters:
                counters[0].reset()
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
                sync()
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
        peft_config: Any
        if spec.get("unsloth"):  # Unsloth's docs: its model (adapters already on) in TRL's trainer
            cfg = SFTConfig(output_dir=out, bf16=True, optim="paged_adamw_32bit", **common)
            peft_config = None
        elif recipe is not None and "own_config" in spec:  # the user's SFTConfig, the recipe as peft_config only
            cfg = SFTConfig(output_dir=out, bf16=DEVICE == "cuda", **spec["own_config"], **common)
            peft_config = recipe
        elif recipe is not None:
            cfg = recipe.sft_config(output_dir=out, **common)
            peft_config = recipe
            if spec.get("fused_optim") is True:
                extra["optimizer_cls_and_kwargs"] = recipe.optimizer_cls_and_kwargs(cfg)
            elif spec.get("fused_optim") is False:  # bitsandbytes' own, which the recipe would replace
                import bitsandbytes as bnb

                adam = {"lr": cfg.learning_rate, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon}
                extra["optimizer_cls_and_kwargs"] = (bnb.optim.PagedAdamW32bit, adam)
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
        counters.append(TokenCounter(trainer.model))
        if a.timeline:
            from timeline import annotate_trainer

            annotate_trainer(trainer)
        load_s = time.time() - t0
        trainer.train()
    peak = peak_allocated()
    starts, ends = times[0::2], times[1::2]
    timed = ends[-1] - starts[a.warmup]  # includes data loading and logging between steps, as in real use
    step_s = timed / a.steps
    tokens = counters[0].count
    opt_ms = opt_events.mean_ms(skip=a.warmup)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    adapter_dtype = str(next(p.dtype for p in trainer.model.parameters() if p.requires_grad))
    if recipe is not None:
        from qlora_plugin.build.context import RECOMPUTE

        grad_ckpt = RECOMPUTE[recipe.gradient_checkpointing] if DEVICE == "cuda" else str(recipe.gradient_checkpointing)
    elif spec.get("unsloth"):
        grad_ckpt = "unsloth (offloaded)"
    else:
        grad_ckpt = "full" if spec["grad_ckpt"] else "none"
    paged = optimizer.paged_bytes() if hasattr(optimizer, "paged_bytes") else None
    row = dict(
        shape=a.shape,
        variant=a.tag or a.variant,
        tok_s=round(tokens / timed),
        tokens_per_step=tokens // a.steps,
        step_s=round(step_s, 4),
        peak_gib=gib(peak),
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
        paged_gib=gib(paged) if paged else None,
        lora_dropout=spec["dropout"],
        adapter_dtype=adapter_dtype,
        warmup=a.warmup,
        steps=a.steps,
        load_s=round(load_s, 1),
        gpu=gpu_name(),
        versions=package_versions(),
        path=(
            "Unsloth FastLanguageModel + SFTTrainer"
            if spec.get("unsloth")
            else "SFTTrainer + LoraConfig"
            if recipe is None
            else "own SFTConfig + peft_config=recipe"
            if "own_config" in spec
            else "SFTTrainer + recipe.sft_config"
        ),
        loss_type=getattr(cfg, "loss_type", None),
        use_liger_kernel=getattr(cfg, "use_liger_kernel", None),
        optim=str(getattr(cfg.optim, "value", cfg.optim)),
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
    record_row(Path(a.json), row)


def unsloth_model(nf4_dir: Path, tokenizer: Any, spec: dict[str, Any]) -> tuple[Any, Any]:
    """Unsloth's QLoRA as its docs show it: ``FastLanguageModel`` over the same pre-quantized NF4
    checkpoint, adapters on the seven projections, its offloaded gradient checkpointing."""
    import torch
    from unsloth import FastLanguageModel

    tokenizer.save_pretrained(nf4_dir)  # Unsloth loads the tokenizer from the model's folder
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(nf4_dir), max_seq_length=SEQ, dtype=torch.bfloat16, load_in_4bit=True, local_files_only=True
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=spec["dropout"],
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        bias="none",
        use_gradient_checkpointing=spec["grad_ckpt"],
        random_state=0,
    )
    return model, tokenizer
