"""Where the trainers' peak memory goes, next to the bare training step.

For Llama 3.2 1B (random init, 4-bit base built as in ``measure_memory.py``),
each path of the recipe, gradient checkpointing on, it runs three steps of
- the bare step ``measure_memory.py`` validates the estimate against,
- transformers' ``Trainer`` with the recipe's arguments,
- TRL's ``SFTTrainer`` with ``recipe.sft_config()`` (where TRL is installed),
records the peak of the forward (``compute_loss``) and of backward + step, and
for the second step replays CUDA's allocation trace to list the live
allocations at the peak by the Python line that made them.

Run: ``python benchmarks/measure_trainers.py --out trainers.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections import defaultdict
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

STEPS = 3
CASES = [(1024, 4), (2048, 4)]


def peak_composition(snapshot: dict[str, Any], baseline: int, top: int = 12) -> dict[str, Any]:
    """Replay an allocation trace; the live blocks at its highest point, grouped by allocating line."""
    live: dict[int, tuple[int, str]] = {}
    current = best = 0
    best_live: dict[int, tuple[int, str]] = {}
    for event in snapshot["device_traces"][0]:
        action = event["action"]
        if action == "alloc":
            live[event["addr"]] = (event["size"], _where(event.get("frames", [])))
            current += event["size"]
            if current > best:
                best, best_live = current, dict(live)
        elif action in ("free_requested", "free_completed") and event["addr"] in live:
            current -= live.pop(event["addr"])[0]
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, where in best_live.values():
        groups[where][0] += size
        groups[where][1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "peak_above_baseline": best,
        "baseline": baseline,
        "by_line": [{"where": where, "bytes": nbytes, "blocks": blocks} for where, (nbytes, blocks) in rows],
    }


def _where(frames: list[dict[str, Any]]) -> str:
    """The innermost Python frame outside torch's own modules (else the innermost one)."""
    useful = [f for f in frames if f.get("filename", "").endswith(".py")]
    for frame in useful:
        name = frame["filename"]
        if "/torch/" not in name or "/torch/utils/checkpoint" in name:
            return f"{name.split('site-packages/')[-1]}:{frame['line']} {frame['name']}"
    return (
        f"{useful[0]['filename'].split('site-packages/')[-1]}:{useful[0]['line']} {useful[0]['name']}"
        if useful
        else "?"
    )


class Recorder:
    """Phase peaks, and the allocation trace of one chosen step."""

    def __init__(self, record_step: int = 1) -> None:
        self.forward = self.backward = 0
        self.step = 0
        self.record_step = record_step
        self.trace: dict[str, Any] | None = None
        self.baseline = 0

    def begin_step(self) -> None:
        if self.step == self.record_step:
            self.baseline = torch.cuda.memory_allocated()
            torch.cuda.memory._record_memory_history(max_entries=2_000_000)
        torch.cuda.reset_peak_memory_stats()

    def after_forward(self) -> None:
        self.forward = max(self.forward, torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()

    def end_step(self) -> None:
        self.backward = max(self.backward, torch.cuda.max_memory_allocated())
        if self.step == self.record_step:
            self.trace = peak_composition(torch.cuda.memory._snapshot(), self.baseline)
            torch.cuda.memory._record_memory_history(enabled=None)
        self.step += 1

    def result(self) -> dict[str, Any]:
        return {
            "forward_peak": self.forward,
            "backward_and_step_peak": self.backward,
            "peak_allocated": max(self.forward, self.backward),
            "at_peak": self.trace,
        }


def bare(model: torch.nn.Module, vocab: int, seq: int, batch: int) -> dict[str, Any]:
    import bitsandbytes as bnb

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW32bit(params, lr=2e-4)
    recorder = Recorder()
    for _ in range(STEPS):
        ids = torch.randint(0, vocab, (batch, seq), device="cuda")
        recorder.begin_step()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        recorder.after_forward()
        loss.backward()
        del loss
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recorder.end_step()
    del optimizer
    return recorder.result()


def with_trainer(
    model: torch.nn.Module, vocab: int, seq: int, batch: int, fast: bool, kind: str, tokenizer: Any
) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from qlora_plugin import qlora_recipe

    recipe = qlora_recipe(r=16, fast_path=fast)
    recorder = Recorder()
    rows = [{"input_ids": ids.tolist()} for ids in torch.randint(0, vocab, (batch * STEPS, seq))]
    common = dict(
        output_dir=f"/tmp/{kind}",
        max_steps=STEPS,
        per_device_train_batch_size=batch,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
    )

    class Steps(TrainerCallback):
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            recorder.begin_step()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            recorder.end_step()

    def wrap(cls: type) -> type:
        class Measured(cls):  # type: ignore[misc, valid-type]
            def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
                out = super().compute_loss(*args, **kwargs)
                recorder.after_forward()
                return out

        return Measured

    if kind == "trainer":
        data = [{"input_ids": torch.tensor(r["input_ids"]), "labels": torch.tensor(r["input_ids"])} for r in rows]
        args = TrainingArguments(remove_unused_columns=False, **common, **recipe.training_args("cuda"))
        trainer = wrap(Trainer)(model=model, args=args, train_dataset=data, callbacks=[Steps()])
    else:
        from datasets import Dataset
        from trl import SFTTrainer

        config = recipe.sft_config(
            max_length=seq, packing=False, dataset_kwargs={"skip_prepare_dataset": True}, **common
        )
        config.model_init_kwargs = None
        trainer = wrap(SFTTrainer)(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[Steps()],
        )
    gc.collect()
    torch.cuda.empty_cache()
    trainer.train()
    result = recorder.result()
    del trainer
    gc.collect()
    return result


def make_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer with ``vocab`` entries (only its ids matter here)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    words.update({"<pad>": 0, "<s>": 1, "</s>": 2})
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="w3")),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from llama_shapes import llama_config
    from measure_memory import build_quantized, prepare

    report: dict[str, Any] = {"runs": []}
    config = llama_config("llama-3.2-1b")
    tokenizer = make_tokenizer(config.vocab_size)
    for fast in (True, False):
        model = prepare(build_quantized(config, "cuda"), fast, True)
        for seq, batch in CASES:
            for kind in ("bare", "trainer", "sft"):
                start = time.perf_counter()
                try:
                    if kind == "bare":
                        result = bare(model, config.vocab_size, seq, batch)
                    else:
                        result = with_trainer(model, config.vocab_size, seq, batch, fast, kind, tokenizer)
                except Exception as error:  # noqa: BLE001 - one failing variant must not hide the others
                    result = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
                    torch.cuda.memory._record_memory_history(enabled=None)
                result.update(
                    path="fast" if fast else "stock",
                    seq=seq,
                    batch=batch,
                    kind=kind,
                    seconds=time.perf_counter() - start,
                )
                report["runs"].append(result)
                with open(args.out, "w", encoding="utf-8") as handle:
                    json.dump(report, handle, indent=1)
                gib = 2**30
                print(
                    f"{result['path']:5} {seq:5} {batch} {kind:8} forward {result.get('forward_peak', 0) / gib:6.2f} "
                    f"backward+step {result.get('backward_and_step_peak', 0) / gib:6.2f} {result.get('error', '')}",
                    flush=True,
                )
                for row in (result.get("at_peak") or {}).get("by_line", [])[:6]:
                    print(f"      {row['bytes'] / gib:6.2f} GiB {row['blocks']:4} blocks  {row['where']}", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
