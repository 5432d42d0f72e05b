"""The benchmark's fixed settings: device, batch shape, LoRA rank, model shapes and the measured variants.

Kept apart so that every other ``bench_*`` module reads the same values (``BENCH_DEVICE``,
``BENCH_SEQ`` and ``BENCH_BATCH`` are read once, here, at import).
"""

from __future__ import annotations

import os
from typing import Any

from llama_shapes import SHAPES as LLAMA_SHAPES

DEVICE = "cuda" if os.environ.get("BENCH_DEVICE", "cuda") == "cuda" else "cpu"
BATCH, SEQ = int(os.environ.get("BENCH_BATCH", 4)), int(os.environ.get("BENCH_SEQ", 2048))
RANK, ALPHA = 16, 32
LR = 2e-4

# The sizes of the published configs (llama_shapes.py); the tiny shape is for CPU dry runs.
SIZE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)
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
    "1b": {key: LLAMA_SHAPES["llama-3.2-1b"][key] for key in SIZE_KEYS},
    "8b": {key: LLAMA_SHAPES["llama-3.1-8b"][key] for key in SIZE_KEYS},
}
VOCAB = LLAMA_SHAPES["llama-3.2-1b"]["vocab_size"]

# name -> settings. "recipe": qlora_recipe overrides, run the way a user would (SFTTrainer for the
# table, recipe -> PEFT -> the recipe's hooks for numerics and the memory sweep); "fused_optim":
# True passes optimizer_cls_and_kwargs=recipe.optimizer_cls_and_kwargs(args), False passes
# bitsandbytes' PagedAdamW32bit, absent passes nothing (what the trainer and recipe pick: the
# README snippet as written). "plugin": FastPathConfig
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
    "qlora-plugin-default": dict(quant=True, trl=True, dropout=0.05, recipe={}),
    # the mission's line: the user's own SFTConfig (bf16, gradient checkpointing, no optim) beside
    # peft_config=qlora_recipe(); --trainer-args adds to it (e.g. a loss_type)
    "qlora-plugin-own-config": dict(
        quant=True, trl=True, dropout=0.05, recipe={}, own_config=dict(gradient_checkpointing=True)
    ),
    # Unsloth's FastLanguageModel + its patched SFTTrainer, as its docs show (bench_unsloth.py)
    "unsloth-qlora": dict(quant=True, unsloth=True, dropout=0.0, grad_ckpt="unsloth"),
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
