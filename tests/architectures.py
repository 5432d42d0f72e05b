"""Tiny configs of the architectures whose targets the tests pin down."""

from __future__ import annotations

from typing import Any

TEXT = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def configs() -> dict[str, Any]:
    """One tiny config per architecture, by a short name."""
    import transformers as T

    gpt = dict(vocab_size=96, bos_token_id=1, eos_token_id=2)
    return {
        "llama": T.LlamaConfig(**TEXT),
        "mistral": T.MistralConfig(**TEXT),
        "qwen2": T.Qwen2Config(**TEXT),
        "qwen3": T.Qwen3Config(**TEXT, head_dim=8),
        "gemma": T.GemmaConfig(**TEXT, head_dim=8),
        "phi3": T.Phi3Config(**TEXT),
        "gpt2": T.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=64, **gpt),
        "gpt_neox": T.GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=64,
            **gpt,
        ),
        "mixtral": T.MixtralConfig(**TEXT, num_local_experts=2, num_experts_per_tok=1),
        "qwen2_moe": T.Qwen2MoeConfig(
            **TEXT, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=32
        ),
        "llava": T.LlavaConfig(
            vision_config=T.CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                image_size=28,
                patch_size=14,
            ),
            text_config=T.LlamaConfig(**TEXT),
            image_token_index=95,
        ),
    }


def build(name: str) -> Any:
    """A real (CPU, random-init) tiny model of architecture ``name``."""
    import torch

    from qlora_plugin.build.models import auto_class

    config = configs()[name]
    torch.manual_seed(0)
    return auto_class(config).from_config(config)


def two_layer_model(name: str = "llama", *, dropout: float = 0.0) -> Any:
    """A random-init two-layer model of architecture ``name``, in training mode, with ``dropout``
    wherever its config has one."""
    import torch

    from qlora_plugin.build.models import auto_class

    config = configs()[name]
    text = getattr(config, "text_config", config)
    for field in ("num_hidden_layers", "n_layer"):
        if hasattr(text, field):
            setattr(text, field, 2)
    if getattr(text, "layer_types", None):  # one attention kind per layer, made for the config's one layer
        text.layer_types = [text.layer_types[0]] * 2
    for field in ("hidden_dropout", "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(text, field):
            setattr(text, field, dropout)
    torch.manual_seed(0)
    return auto_class(config).from_config(config).train()
