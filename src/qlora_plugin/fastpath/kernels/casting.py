"""Dtypes of the frozen model and of the adapters.

``prepare_model_for_kbit_training`` casts every non-4-bit parameter (embeddings,
norms, the output head) to fp32, and PEFT upcasts adapters to fp32 by default; with
the activations following those weights, much of the model then runs fp32 GEMMs.
``cast_frozen_params`` undoes the first; ``cast_adapters`` sets the adapters' master
dtype (what the optimizer updates), independent of the compute dtype of their GEMMs.
"""

from __future__ import annotations

import torch
from torch import nn

# Buffers that must stay fp32 (rotary frequencies).
_KEEP_FP32_BUFFERS = ("inv_freq", "original_inv_freq")


def cast_frozen_params(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast frozen floating-point parameters that are not 4-bit to ``dtype``; returns how many changed."""
    n = 0
    for p in model.parameters():
        if p.requires_grad or not p.is_floating_point() or p.dtype == dtype:
            continue
        if type(p).__name__ in ("Params4bit", "Int8Params"):
            continue
        p.data = p.data.to(dtype)
        n += 1
    for module in model.modules():
        for bname, b in list(module.named_buffers(recurse=False)):
            if b.is_floating_point() and b.dtype != dtype and bname not in _KEEP_FP32_BUFFERS and "lora" not in bname:
                module._buffers[bname] = b.to(dtype)
    return n


def cast_adapters(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast every trainable parameter (the adapters) to ``dtype``; returns how many changed."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n
