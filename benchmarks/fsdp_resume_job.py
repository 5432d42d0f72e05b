"""FSDP2 checkpoint and resume with a user's own ``SFTConfig``, on each rank of ``accelerate launch``.

    accelerate launch --config_file configs/accelerate/fsdp2.yaml benchmarks/fsdp_resume_job.py OUT [--resume]

The user's path of issue 17: ``SFTTrainer(model=path, args=SFTConfig(...), peft_config=qlora_recipe())``
with the user's own optimizer choice (``paged_adamw_32bit``, which FSDP cannot shard: the recipe
swaps it for torch's AdamW with one warning), bf16 and gradient checkpointing, on the shipped
tiny Llama and headline rows. Trains ``STEPS`` steps and checkpoints every ``SAVE_EVERY``; with
``--resume`` it restarts from the newest checkpoint in OUT and trains to the same end. Rank 0
writes ``OUT/losses[-resumed].json`` (step -> loss, optimizer class, last checkpoint) and, at the
end, the adapter to ``OUT/adapter``. ``--check-adapter`` (one process) loads that adapter with
PEFT over the recipe's 4-bit model and reports its loss on the first batch: the saved adapter is
a normal PEFT adapter; ``--compare RESUMED`` sets a resumed run's losses beside the uninterrupted
one's. ``benchmarks/multigpu_extras.sh resume`` runs them in order.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "examples"))

STEPS = 8
SAVE_EVERY = 4


def train(out: Path, resume: bool) -> None:
    import torch
    from datasets import Dataset
    from evaluate_headlines import DEFAULT_BASE
    from trl import SFTConfig, SFTTrainer
    from trl_sft import prompt_completion_rows

    from qlora_plugin import qlora_recipe

    config = SFTConfig(  # the user's own settings, not recipe.sft_config()
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        optim="paged_adamw_32bit",
        bf16=torch.cuda.is_available(),  # a CPU smoke run computes in float32
        gradient_checkpointing=True,
        logging_steps=1,
        save_strategy="steps",
        save_steps=SAVE_EVERY,
        max_length=96,
        report_to="none",
        seed=0,
    )
    trainer = SFTTrainer(
        model=str(DEFAULT_BASE),
        args=config,
        train_dataset=Dataset.from_list(prompt_completion_rows()),
        peft_config=qlora_recipe(),
    )
    trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model(str(out / "adapter"))
    if trainer.args.process_index == 0:
        losses = {str(e["step"]): e["loss"] for e in trainer.state.log_history if "loss" in e}
        checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
        optimizer = type(trainer.optimizer.optimizer)  # inside accelerate's wrapper
        result = {
            "losses": losses,
            "optimizer": f"{optimizer.__module__}.{optimizer.__name__}",
            "checkpoints": checkpoints,
        }
        (out / ("losses-resumed.json" if resume else "losses.json")).write_text(json.dumps(result, indent=1))


def check_adapter(out: Path) -> None:
    import torch
    from evaluate_headlines import DEFAULT_BASE
    from peft import PeftModel
    from transformers import AutoTokenizer
    from trl_sft import prompt_completion_rows

    from qlora_plugin import qlora_recipe

    base_dir = DEFAULT_BASE
    recipe = qlora_recipe()
    device = 0 if torch.cuda.is_available() else "cpu"
    model = PeftModel.from_pretrained(recipe.load_model(str(base_dir), device_map={"": device}), str(out / "adapter"))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    row = prompt_completion_rows()[0]
    prompt = tokenizer(row["prompt"]).input_ids
    ids = torch.tensor([tokenizer(row["prompt"] + row["completion"]).input_ids], device=model.device)
    labels = ids.clone()
    labels[:, : len(prompt)] = -100  # the completion's loss, as the job trained it
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss.item()
        with model.disable_adapter():
            base_loss = model(input_ids=ids, labels=labels).loss.item()
    (out / "adapter-check.json").write_text(
        json.dumps({"completion_loss_with_adapter": loss, "completion_loss_base": base_loss})
    )


def compare(first: Path, resumed: Path) -> dict:
    """The resumed run's losses after its checkpoint against the uninterrupted run's, and what each saved."""
    whole = json.loads((first / "losses.json").read_text())
    later = json.loads((resumed / "losses-resumed.json").read_text())
    steps = [step for step in later["losses"] if int(step) > SAVE_EVERY]
    gaps = [abs(later["losses"][s] - whole["losses"][s]) / abs(whole["losses"][s]) for s in steps]
    return {
        "steps_compared": steps,
        "max_rel_loss_gap": max(gaps) if gaps else None,
        "uninterrupted": whole,
        "resumed": later,
        "checkpoint_files": sorted(p.name for p in (first / f"checkpoint-{SAVE_EVERY}").iterdir()),
        "adapter": json.loads((resumed / "adapter-check.json").read_text()),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--check-adapter", action="store_true")
    parser.add_argument("--compare", type=Path, metavar="RESUMED", help="print the comparison of OUT and RESUMED")
    options = parser.parse_args()
    if options.compare:
        print(json.dumps(compare(options.out, options.compare), indent=1))
    elif options.check_adapter:
        check_adapter(options.out)
    else:
        train(options.out, options.resume)
