"""NF4/FP4 dequantization of a bitsandbytes 4-bit weight, with a pure-PyTorch reference.

``dequantize_4bit`` is what the fused LoRA layer calls: on CUDA it can use a single
Triton kernel that also decodes the double-quantized block constants; elsewhere it
uses bitsandbytes' own ``dequantize_4bit``. ``dequantize_4bit_reference`` spells
the format out in plain PyTorch and is what the tests hold both against.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from qlora_plugin.core.patches import c_function
from qlora_plugin.fastpath.kernels._backend import use_gpu_kernels

_CACHE_ATTR = "_qlora_fp32_absmax"
DequantFn = Callable[[torch.Tensor, Any, torch.dtype], torch.Tensor]


def make_dequantizer(*, triton: bool = False, cache_block_constants: bool = False) -> DequantFn:
    """A dequantize function with one model's choices (they never change another model's layers).

    ``triton``: one-launch Triton kernel on CUDA instead of bitsandbytes' kernels.
    ``cache_block_constants``: keep each weight's decoded fp32 block constants on its
    quant state (1/16 of the bf16 weight's size, about 0.44 GB for an 8B model) to save
    two launches and bitsandbytes' Python wrapper per dequantization.
    """
    return functools.partial(dequantize_4bit, triton=triton, cache_block_constants=cache_block_constants)


def block_constants(quant_state: Any) -> torch.Tensor:
    """The fp32 absmax of every ``blocksize`` block, decoding double quantization if used."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    s2 = quant_state.state2
    idx = quant_state.absmax.long()
    blocks2 = torch.arange(idx.numel(), device=idx.device) // s2.blocksize
    return s2.code.float()[idx] * s2.absmax.float()[blocks2] + float(quant_state.offset)


def dequantize_4bit_reference(weight: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
    """Plain-PyTorch dequantization of a bitsandbytes 4-bit weight (any storage dtype).

    Byte ``i`` holds element ``2i`` in its high nibble and ``2i+1`` in its low
    nibble; element ``j`` is ``code[nibble] * absmax[j // blocksize]``.
    """
    packed = weight.reshape(-1).view(torch.uint8)
    n = 1
    for d in quant_state.shape:
        n *= int(d)
    nibbles = torch.stack(((packed >> 4), (packed & 0x0F)), dim=1).reshape(-1)[:n].long()
    code = quant_state.code.float().to(packed.device)
    absmax = block_constants(quant_state)
    scale = absmax.repeat_interleave(quant_state.blocksize)[:n]
    return (code[nibbles] * scale).to(dtype).reshape(quant_state.shape)


def dequantize_4bit(
    weight: torch.Tensor,
    quant_state: Any,
    dtype: torch.dtype,
    *,
    triton: bool = False,
    cache_block_constants: bool = False,
) -> torch.Tensor:
    """Dequantize ``weight`` to ``dtype`` with the fastest implementation for its device.

    ``triton`` and ``cache_block_constants``: see :func:`make_dequantizer`.
    """
    if triton and use_gpu_kernels(weight):
        from qlora_plugin.fastpath.kernels.triton_nf4 import dequantize_4bit_triton  # Triton, on CUDA only

        return dequantize_4bit_triton(weight, quant_state, dtype)
    if weight.is_cuda and weight.is_contiguous() and weight.device.index == torch.cuda.current_device():
        kernels = _cuda_kernels(quant_state.quant_type, dtype)
        if kernels is not None:
            return _dequantize_4bit_cuda(weight, quant_state, dtype, *kernels, cache=cache_block_constants)
    import bitsandbytes.functional as bnbf

    out = bnbf.dequantize_4bit(weight, quant_state)
    return out if out.dtype == dtype else out.to(dtype)


@functools.cache
def _cuda_kernels(quant_type: str, dtype: torch.dtype) -> tuple[Any, Any] | None:
    """bitsandbytes' CUDA entry points for (4-bit dequant to ``dtype``, blockwise fp32 dequant), or None."""
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    if dtype not in names or quant_type not in ("nf4", "fp4"):
        return None
    import ctypes

    # bitsandbytes declares (code, A, absmax, out, blocksize, numel, stream) for both
    signature = [ctypes.c_void_p] * 4 + [ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p]
    dequant_4bit = c_function(
        "bnb-dequantize-c-calls", f"cdequantize_blockwise_{names[dtype]}_{quant_type}", signature, None
    )
    dequant_blockwise = c_function("bnb-dequantize-c-calls", "cdequantize_blockwise_fp32", signature, None)
    if dequant_4bit is None or dequant_blockwise is None:
        return None
    return dequant_4bit, dequant_blockwise


def _dequantize_4bit_cuda(
    weight: torch.Tensor,
    quant_state: Any,
    dtype: torch.dtype,
    dequant_4bit: Any,
    dequant_blockwise: Any,
    *,
    cache: bool = False,
) -> torch.Tensor:
    """The same CUDA kernels as ``bitsandbytes.functional.dequantize_4bit``, called directly.

    bitsandbytes reaches them through its registered ``torch.ops`` (tens of microseconds
    of host time per call); small models, whose steps are bound by the host, pay that on
    every layer. With ``cache`` the decoded fp32 block constants are kept, so one
    launch remains.
    """
    stream = torch._C._cuda_getCurrentRawStream(weight.device.index)
    absmax = getattr(quant_state, _CACHE_ATTR, None)
    if absmax is None:
        if quant_state.nested:
            s2 = quant_state.state2
            nested = quant_state.absmax.contiguous()
            absmax = torch.empty(nested.shape, dtype=torch.float32, device=weight.device)
            dequant_blockwise(
                s2.code.data_ptr(),
                nested.data_ptr(),
                s2.absmax.data_ptr(),
                absmax.data_ptr(),
                s2.blocksize,
                nested.numel(),
                stream,
            )
            absmax += quant_state.offset
        else:
            absmax = quant_state.absmax.float().contiguous()
        if cache:
            setattr(quant_state, _CACHE_ATTR, absmax)
    out = torch.empty(tuple(quant_state.shape), dtype=dtype, device=weight.device)
    dequant_4bit(None, weight.data_ptr(), absmax.data_ptr(), out.data_ptr(), quant_state.blocksize, out.numel(), stream)
    return out
