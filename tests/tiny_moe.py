"""Tiny mixture-of-experts models of four families (4 experts, top-2, hidden 64), built from configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss", "qwen2_moe")
SHARED = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts_per_tok=2,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=3,
    tie_word_embeddings=False,
)


def moe_config(family: str, vocab_size: int = 128, **overrides: Any) -> Any:
    """The config of a tiny ``family`` model: 4 experts of width 32, top-2 routing; ``overrides`` on top."""
    from transformers import GptOssConfig, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    shared = {**SHARED, **overrides}
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            vocab_size=vocab_size, intermediate_size=128, moe_intermediate_size=32, num_experts=4, head_dim=16, **shared
        )
    if family == "mixtral":
        return MixtralConfig(vocab_size=vocab_size, intermediate_size=32, num_local_experts=4, **shared)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(
            vocab_size=vocab_size,
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=4,
            **shared,
        )
    if family == "gpt_oss":
        return GptOssConfig(
            vocab_size=vocab_size,
            intermediate_size=32,
            num_local_experts=4,
            head_dim=16,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **shared,
        )
    raise ValueError(family)


def moe_model(family: str, vocab_size: int = 128, seed: int = 0, dtype: Any = None, **overrides: Any) -> Any:
    """A randomly initialised tiny ``family`` model (float32 unless ``dtype``; config ``overrides``); experts (and
    their biases, where the family has them) drawn with std 0.1."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(family, vocab_size, **overrides))
    with torch.no_grad():  # transformers' 0.02 makes the experts' share of the output too small to test
        for name, param in model.named_parameters():
            if ".experts." in name and param.dim() in (2, 3):
                param.normal_(0.0, 0.1)
    return model.to(dtype) if dtype is not None else model


def moe_model_dir(family: str, directory: Path, seed: int = 0) -> Path:
    """A tiny ``family`` model (bf16 on disk) with the word-level tokenizer of ``tiny.py``."""
    import torch
    from tiny import train_tokenizer

    tokenizer = train_tokenizer(directory)
    moe_model(family, vocab_size=len(tokenizer), seed=seed, dtype=torch.bfloat16).save_pretrained(directory)
    return directory
