"""The model shapes the memory estimate is validated on: Llama 3.2 1B, Llama 3.1 8B and 70B.

Only the sizes that decide memory are set (the published configs' dimensions);
RoPE scaling is left at the default because it changes no tensor's size.
"""

from __future__ import annotations

from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama-3.1-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama-3.1-70b": dict(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
}


def llama_config(name: str, **changes: Any) -> Any:
    """A ``LlamaConfig`` of shape ``name`` (SDPA attention), with ``changes`` applied."""
    from transformers import LlamaConfig

    config = LlamaConfig(**{**SHAPES[name], **changes})
    config._attn_implementation = "sdpa"
    return config
