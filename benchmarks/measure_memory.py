"""Measure the peak GPU memory of QLoRA training steps, to validate ``qlora estimate``.

For each model shape (random init, no hub) and each path of the recipe:
- the base is built in bf16 on the GPU and every linear layer of the decoder is
  quantized to 4-bit NF4 (blocksize 64, double quant) with the plugin's own
  ``quantize_linear``; the output head stays unquantized, as transformers does;
- the plugin prepares it (``prepare_for_training``: PEFT's
  ``prepare_model_for_kbit_training`` on the stock path, bf16 throughout on the
  fast path) and PEFT adds LoRA r 16 on every linear layer the recipe discovers;
- each (sequence length, batch) runs a few steps of what the transformers Trainer
  does with the recipe's arguments: forward and loss under bf16 autocast, the
  model outputs dropped before backward, backward, gradient clipping at 0.3,
  ``PagedAdamW32bit`` step, ``zero_grad(set_to_none=True)``.

Recorded per case: ``torch.cuda.max_memory_allocated`` over the steps (and per
phase), the bytes of the paged optimizer states (CUDA managed memory, which the
PyTorch allocator does not count), and device memory in use from
``cudaMemGetInfo``. Without checkpointing, one forward's saved tensors are also
listed by autograd node (the inventory the activation model is checked against).

Run: ``python benchmarks/measure_memory.py --out peaks.json`` (``--device cpu
--tiny`` is a smoke test of the script itself).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections import defaultdict
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CASES = [(1024, 1), (1024, 4), (2048, 1), (2048, 4)]
STEPS = 3


def build_quantized(config: Any, device: str) -> torch.nn.Module:
    """A random-init causal LM whose decoder linear layers are 4-bit NF4 (double quant)."""
    from transformers import AutoModelForCausalLM

    from qlora_plugin import qlora_recipe
    from qlora_plugin.build.quantization import quantize_linear

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    quant = qlora_recipe()  # nf4, double quant, uint8 storage
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(parent, child_name, quantize_linear(child, quant, torch.bfloat16))
                    del child
    model.is_loaded_in_4bit = True  # what transformers' bnb loader marks; PEFT reads it
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return model


def prepare(model: torch.nn.Module, fast: bool, checkpointing: bool) -> torch.nn.Module:
    """The plugin's preparation and PEFT's LoRA wrapping, as a training run does them."""
    from peft import get_peft_model

    from qlora_plugin import qlora_recipe
    from qlora_plugin.build.prepare import prepare_for_training

    recipe = qlora_recipe(r=16, fast_path=fast, gradient_checkpointing=checkpointing, model=model)
    model = prepare_for_training(model, recipe)
    model = get_peft_model(model, recipe, autocast_adapter_dtype=not fast)
    if fast:  # adapters in the compute dtype: no fp32 anywhere
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    return model


def saved_tensor_inventory(loss: torch.Tensor, tokens: int, model: torch.nn.Module) -> dict[str, Any]:
    """Bytes of every distinct storage autograd saved for backward (parameters left out),
    by node, attribute, dtype and last dimension."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0])
    seen: set[int] = set()
    stack, visited = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                value = getattr(node, attr)
            except Exception:  # noqa: BLE001 - some saved values cannot be read back
                continue
            for tensor in value if isinstance(value, (tuple, list)) else [value]:
                if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
                    continue
                storage = tensor.untyped_storage()
                if storage.data_ptr() in seen or storage.data_ptr() in params:
                    continue
                seen.add(storage.data_ptr())
                dtype = str(tensor.dtype).removeprefix("torch.")
                key = f"{node.name()}.{attr.removeprefix('_saved_')}:{dtype}:{tensor.shape[-1] if tensor.dim() else 0}"
                totals[key][0] += 1
                totals[key][1] += storage.nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    rows = {key: {"count": count, "bytes_per_token": nbytes / tokens} for key, (count, nbytes) in totals.items()}
    return {
        "by_node": dict(sorted(rows.items(), key=lambda kv: -kv[1]["bytes_per_token"])),
        "total_bytes": sum(nbytes for _, nbytes in totals.values()),
    }


def device_used(device: str) -> int:
    if device != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info()
    return total - free


def run_case(
    model: torch.nn.Module, vocab: int, seq: int, batch: int, device: str, inventory: bool = False
) -> dict[str, Any]:
    """A few training steps at (seq, batch); peak memory overall and per phase."""
    import bitsandbytes as bnb

    cuda = device == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW32bit(params, lr=2e-4)
    model.train()
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    allocated = torch.cuda.memory_allocated if cuda else (lambda: 0)
    peak = torch.cuda.max_memory_allocated if cuda else (lambda: 0)
    result: dict[str, Any] = {
        "seq": seq,
        "batch": batch,
        "allocated_before": allocated(),
        "device_used_before": device_used(device),
    }
    phases: dict[str, int] = defaultdict(int)
    step_times = []
    for step in range(STEPS):
        start = time.perf_counter()
        ids = torch.randint(0, vocab, (batch, seq), device=device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss  # the outputs (and logits) die here
        phases["forward_peak"] = max(phases["forward_peak"], peak())
        phases["after_forward"] = max(phases["after_forward"], allocated())
        if inventory and step == 0:
            result["saved_tensors"] = saved_tensor_inventory(loss, batch * seq, model)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        loss.backward()
        del loss
        phases["backward_peak"] = max(phases["backward_peak"], peak())
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        phases["step_peak"] = max(phases["step_peak"], peak())
        if cuda:
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - start)
        if step == 0:
            result["device_used_after_first_step"] = device_used(device)
    result.update(phases)
    result["peak_allocated"] = max(phases["forward_peak"], phases["backward_peak"], phases["step_peak"])
    result["max_reserved"] = torch.cuda.max_memory_reserved() if cuda else 0
    states = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    result["paged_state_bytes"] = sum(t.nbytes for t in states if getattr(t, "is_paged", False))
    result["torch_state_bytes"] = sum(t.nbytes for t in states if not getattr(t, "is_paged", False))
    result["step_seconds"] = step_times
    del optimizer, states
    gc.collect()
    return result


def trainer_case(model: torch.nn.Module, vocab: int, seq: int, batch: int, fast: bool, out_dir: str) -> dict[str, Any]:
    """The same steps through transformers' Trainer with the recipe's arguments (a cross-check)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from qlora_plugin import qlora_recipe

    class Peak(TrainerCallback):
        value = 0

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            Peak.value = max(Peak.value, torch.cuda.max_memory_allocated())

    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, vocab, (batch * STEPS, seq))]
    settings = qlora_recipe(r=16, fast_path=fast).training_args("cuda")
    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=STEPS,
        per_device_train_batch_size=batch,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        **settings,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Peak()])
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    paged = sum(
        t.nbytes
        for state in trainer.optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor) and getattr(t, "is_paged", False)
    )
    result = {
        "seq": seq,
        "batch": batch,
        "peak_allocated": max(Peak.value, torch.cuda.max_memory_allocated()),
        "paged_state_bytes": paged,
        "optim": settings["optim"],
    }
    del trainer
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a small shape and one case (smoke test)")
    parser.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b")
    args = parser.parse_args()

    import bitsandbytes
    import peft
    import transformers
    from llama_shapes import llama_config

    report: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "gpu_total_bytes": torch.cuda.mem_get_info()[1] if args.device == "cuda" else 0,
        "steps_per_case": STEPS,
        "runs": [],
    }

    def save() -> None:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)

    plan = []  # (model, path, checkpointing, cases, inventory case, trainer case)
    for name in args.models.split(","):
        small = name == "llama-3.2-1b"
        for fast in (False, True):
            plan.append((name, fast, True, CASES, None, (2048, 4) if small else None))
            no_ckpt = CASES if small else [(1024, 1), (2048, 1)]
            plan.append((name, fast, False, no_ckpt, (1024, 1), None))
    if args.tiny:
        shape = dict(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
        )
        plan = [(f"tiny-{p[0]}", p[1], p[2], [(64, 2)], (64, 2), None) for p in plan[:4]]

    for name, fast, checkpointing, cases, inventory_case, trainer_at in plan:
        run: dict[str, Any] = {
            "model": name.removeprefix("tiny-"),
            "path": "fast" if fast else "stock",
            "gradient_checkpointing": checkpointing,
            "cases": [],
        }
        report["runs"].append(run)
        start = time.perf_counter()
        config = llama_config(name.removeprefix("tiny-"), **(shape if args.tiny else {}))
        if args.tiny:
            run["config"] = config.to_dict()
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            model = prepare(build_quantized(config, args.device), fast, checkpointing)
        except Exception as error:  # noqa: BLE001 - record it and go on with the other runs
            run["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            print(name, run["path"], "build failed:", run["error"], flush=True)
            save()
            continue
        run["allocated_after_build"] = torch.cuda.memory_allocated() if args.device == "cuda" else 0
        run["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        run["adapter_dtypes"] = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
        run["build_seconds"] = time.perf_counter() - start
        for seq, batch in cases:
            try:
                case = run_case(
                    model, config.vocab_size, seq, batch, args.device, inventory=(seq, batch) == inventory_case
                )
            except torch.OutOfMemoryError as error:
                case = {"seq": seq, "batch": batch, "error": f"out of memory: {str(error)[:200]}"}
                gc.collect()
                torch.cuda.empty_cache()
            run["cases"].append(case)
            save()
            print(
                f"{name:14} {run['path']:5} ckpt={checkpointing!s:5} seq={seq} batch={batch} "
                f"peak={case.get('peak_allocated', 0) / 2**30:.2f} GiB "
                f"paged={case.get('paged_state_bytes', 0) / 2**20:.0f} MiB "
                f"{case.get('error', '')}",
                flush=True,
            )
        if trainer_at and args.device == "cuda":
            try:
                run["trainer"] = trainer_case(model, config.vocab_size, *trainer_at, fast, f"/tmp/trainer-{name}")
            except Exception as error:  # noqa: BLE001 - a cross-check; the main cases stand without it
                run["trainer"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            print("trainer", run["trainer"], flush=True)
        del model
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        save()
    print(f"{'model':14} {'path':5} {'ckpt':5} {'seq':>5} {'batch':>5} {'peak GiB':>9} {'paged MiB':>9} {'s/step':>7}")
    for run in report["runs"]:
        for case in run["cases"]:
            print(
                f"{run['model']:14} {run['path']:5} {run['gradient_checkpointing']!s:5} {case['seq']:5} "
                f"{case['batch']:5} {case.get('peak_allocated', 0) / 2**30:9.2f} "
                f"{case.get('paged_state_bytes', 0) / 2**20:9.0f} {min(case.get('step_seconds') or [0]):7.2f}"
            )


if __name__ == "__main__":
    main()
