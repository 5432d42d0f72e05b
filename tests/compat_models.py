"""Tiny random models of each family the compatibility matrix covers, with a word-level tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def family_config(family: str, vocab_size: int, ids: dict[str, int], **sizes: Any) -> Any:
    """A small config of ``family`` (llama, qwen2, qwen3, mistral, gemma2, gemma3, phi3, qwen2_moe)."""
    import transformers as T

    text = {**TEXT, **sizes, "vocab_size": vocab_size, **ids}
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    configs = {
        "llama": lambda: T.LlamaConfig(**text),
        "qwen2": lambda: T.Qwen2Config(**text),
        "qwen3": lambda: T.Qwen3Config(**text, head_dim=head_dim),
        "mistral": lambda: T.MistralConfig(**text, sliding_window=None),
        "gemma2": lambda: T.Gemma2Config(**text, head_dim=head_dim),
        "gemma3": lambda: T.Gemma3TextConfig(**text, head_dim=head_dim),
        "phi3": lambda: T.Phi3Config(**text),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(
            **text, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64
        ),
    }
    return configs[family]()


def save_tiny_family(family: str, directory: Path, dtype: str = "float32", seed: int = 0, **sizes: Any) -> Path:
    """Save a random-init causal LM of ``family`` and its tokenizer to ``directory`` (once)."""
    import torch
    from tiny import train_tokenizer
    from transformers import AutoModelForCausalLM

    if (directory / "config.json").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(directory)
    ids = dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    config = family_config(family, len(tokenizer), ids, **sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.save_pretrained(directory)
    return directory
