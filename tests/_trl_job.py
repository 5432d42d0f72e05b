"""A small TRL QLoRA job with the recipe's checkpoint guard, run in-process by tests or as a script they signal.

    python tests/_trl_job.py MODEL_DIR OUTPUT_DIR MAX_STEPS [--resume]

prints one line per logged step: ``step <n> loss <value>``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

SENTENCES = [
    "the cat sat on the mat and looked at the red door",
    "a green frog jumps over the quiet pond at night",
    "seven blue birds sing near the old stone bridge",
    "my brother reads a long book about distant stars",
]


def train(
    model_dir: str | Path,
    out: str | Path,
    max_steps: int,
    *,
    resume: bool = False,
    seed: int = 0,
    save_steps: int = 2,
    **sft: Any,
) -> Any:
    """Train the tiny model with the recipe (checkpoint every ``save_steps``); return the trainer."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTTrainer

    from qlora_plugin import qlora_recipe

    class PrintLoss(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                print(f"step {state.global_step} loss {logs['loss']!r}", flush=True)

    recipe = qlora_recipe(compute_dtype="float32", learning_rate=5e-3, lr_scheduler_type="constant", warmup_ratio=0.0)
    settings = {
        "output_dir": str(out),
        "max_steps": max_steps,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": save_steps,
        "report_to": "none",
        "max_length": 32,
        "seed": seed,
    }
    config = recipe.sft_config(**{**settings, **sft})
    trainer = SFTTrainer(
        model=str(model_dir),
        args=config,
        train_dataset=Dataset.from_dict({"text": SENTENCES * 4}),
        peft_config=recipe,
        callbacks=[*recipe.callbacks(), PrintLoss()],
    )
    trainer.train(resume_from_checkpoint=True if resume else None)
    return trainer


def losses(trainer: Any) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


if __name__ == "__main__":
    model_dir, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    train(model_dir, out, steps, resume="--resume" in sys.argv)
