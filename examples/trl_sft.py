#!/usr/bin/env python3
"""The tiny job through TRL: QLoRA on the shipped tiny Llama and headline data.

``peft_config=recipe`` puts LoRA on the discovered targets over a 4-bit base;
``args=recipe.sft_config(...)`` adds 4-bit loading of the model named by path,
paged AdamW and the precision for the device; ``callbacks=recipe.callbacks()``
keeps checkpoints complete or absent. Runs on a CPU in about a minute.

Usage, from the repository root::

    python examples/trl_sft.py [--output-dir outputs/trl-default] [--max-steps N]
    python examples/evaluate_headlines.py --adapter outputs/trl-default
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

from evaluate_headlines import DEFAULT_BASE, REPO, alpaca_prompt, read_rows  # noqa: E402

TRAIN = REPO / "examples/assets/headlines/train.jsonl"


def prompt_completion_rows() -> list[dict[str, str]]:
    """The training headlines as TRL prompt/completion pairs (Alpaca prompts): the loss covers only the completion."""
    return [
        {"prompt": alpaca_prompt(row["input"], row["instruction"]), "completion": row["output"]}
        for row in read_rows(TRAIN)
    ]


def main(argv: list[str] | None = None) -> Path:
    from datasets import Dataset
    from trl import SFTTrainer

    from qlora_plugin import qlora_recipe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs/trl-default")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop early (default: 2 epochs)")
    args = parser.parse_args(argv)

    dataset = Dataset.from_list(prompt_completion_rows())
    # As configs/qlora.yml: float32 compute (CPUs without bf16 units run bf16 far slower).
    recipe = qlora_recipe(
        compute_dtype="float32",
        learning_rate=2e-3,
        num_train_epochs=2,
        per_device_train_batch_size=16,
        warmup_ratio=0.05,
    )
    config = recipe.sft_config(
        output_dir=str(args.output_dir),
        max_steps=args.max_steps,
        max_length=96,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        seed=42,
    )
    trainer = SFTTrainer(
        model=str(DEFAULT_BASE), args=config, train_dataset=dataset, peft_config=recipe, callbacks=recipe.callbacks()
    )
    trainer.train()
    trainer.save_model(str(args.output_dir))
    print(f"adapter saved to {args.output_dir}")
    return args.output_dir


if __name__ == "__main__":
    main()
