"""Which implementation a tensor gets: GPU kernels (Triton, Liger) or the pure-PyTorch reference.

Nothing here imports Triton or Liger; it only asks whether they could be imported.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from qlora_plugin.core.patches import allowed


@functools.cache
def triton_available() -> bool:
    """True when Triton is installed and a CUDA device is visible."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


@functools.cache
def liger_available() -> bool:
    """True when Liger Kernel is installed in a tested version and a CUDA device is visible."""
    if not (triton_available() and importlib.util.find_spec("liger_kernel") is not None):
        return False

    return allowed("liger-autograd-functions")


def use_gpu_kernels(t: torch.Tensor) -> bool:
    """True when ``t`` lives on a CUDA device and Triton can run there."""
    return t.is_cuda and triton_available()


def use_liger(t: torch.Tensor) -> bool:
    """True when Liger's Triton kernels can serve ``t``."""
    return t.is_cuda and liger_available()
