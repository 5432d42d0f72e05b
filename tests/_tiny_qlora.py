"""Tiny real 4-bit Llama models for the kernel tests (shared by CPU and CUDA tests)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

VOCAB = 384


def tiny_llama_checkpoint(path: Path, *, hidden: int = 128, inter: int = 352, layers: int = 2, seed: int = 0) -> Path:
    """Save a random-init bf16 Llama (odd MLP width, GQA) to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def load_4bit(path: Path, device: str = "cpu") -> torch.nn.Module:
    """Load ``path`` with NF4, blocksize 64, double quantization, bf16 compute."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.bfloat16, device_map=device)


def lora(model: torch.nn.Module, *, stock: bool, seed: int = 1, dropout: float = 0.0) -> torch.nn.Module:
    """Wrap ``model`` in LoRA r=16, alpha=32 on all linear layers; B drawn non-zero.

    ``stock``: prepare_model_for_kbit_training first (fp32 upcasts, PEFT's fp32 adapters).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if stock:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in sorted(pm.named_parameters()):
        if "lora_B" in name:
            p.data = (torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype)
    return pm


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
