"""Fast path for QLoRA training: fused LoRA-over-NF4 layers, logit-free loss, selective
recompute and a paged AdamW with a multi-tensor step.

Importing this package never imports Triton, Liger or other CUDA-only code; those load
inside the functions that use them, and only for tensors on a CUDA device. Each piece
has a pure-PyTorch reference path that runs on CPU.
"""

from qlora_plugin.fastpath.kernels.fast_path import FastPathConfig, FastPathReport, apply_fast_path
from qlora_plugin.fastpath.kernels.optim import PagedAdamW
from qlora_plugin.fastpath.kernels.recompute import set_recompute

__all__ = ["FastPathConfig", "FastPathReport", "PagedAdamW", "apply_fast_path", "set_recompute"]
