"""A tiny TRL QLoRA job for multi-process tests: run alone, or on each rank of ``accelerate launch``.

    accelerate launch --cpu --num_processes 2 tests/_ddp_job.py MODEL_DIR OUT_DIR BATCH [GRAD_ACCUM] [--preloaded]

Trains ``MAX_STEPS`` steps with ``recipe.sft_config(...)`` in float32 (no dropout, so ranks
and a single process draw nothing at random), saves the adapter to ``OUT_DIR/adapter``, and
on the main process writes ``OUT_DIR/result.json``: the logged per-step losses, the world
size, and where each rank's 4-bit weights and its model_init_kwargs' device_map were.
``--preloaded``: the model is loaded in float32 by the script and quantized in place by the recipe.
``--fsdp``: FSDP2 through ``SFTConfig(fsdp=..., fsdp_config={"version": 2, ...})``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from _rank_exit import exit_rank  # noqa: E402 - tests/ is this script's folder
from tiny import SENTENCES  # noqa: E402

MAX_STEPS = 4


FSDP2 = {"fsdp": "full_shard", "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}


def main(
    model_dir: str, out: str, batch: int, grad_accum: int = 1, preloaded: bool = False, fsdp: bool = False
) -> None:
    import torch
    import torch.distributed as dist
    from datasets import Dataset
    from trl import SFTTrainer

    from qlora_plugin import qlora_recipe

    recipe = qlora_recipe(
        compute_dtype="float32",
        lora_dropout=0.0,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
        gradient_checkpointing=False,
    )
    config = recipe.sft_config(
        output_dir=out,
        max_steps=MAX_STEPS,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=grad_accum,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=16,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        **(FSDP2 if fsdp else {}),
    )
    model: Any = model_dir
    if preloaded:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_dict({"text": SENTENCES * 4}),
        peft_config=recipe,
    )
    trainer.train()
    trainer.save_model(str(Path(out) / "adapter"))

    from qlora_plugin.build.distributed import current_launch, rank_device_map

    launch = current_launch()
    devices = sorted({str(p.device) for n, p in trainer.model.named_parameters() if "base_layer" in n})
    probe = {"devices": devices, "launch": [launch.world_size, launch.local_rank], "cuda_map": rank_device_map("cuda")}
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    gathered: list[Any] = [probe]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, probe)
    if trainer.args.process_index == 0:
        result = {
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            "world_size": world,
            "ranks": gathered,  # per rank: where the 4-bit bases are, its launch, its device_map on CUDA
            "device_map": (config.model_init_kwargs or {}).get("device_map"),
            "quant_storage": str(
                next(p.quant_storage for p in trainer.model.parameters() if hasattr(p, "quant_storage"))
            ),
        }
        (Path(out) / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(
        args[0],
        args[1],
        int(args[2]),
        int(args[3]) if len(args) > 3 else 1,
        preloaded="--preloaded" in sys.argv,
        fsdp="--fsdp" in sys.argv,
    )
    exit_rank()
