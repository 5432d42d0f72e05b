"""Triton kernel: 4-bit (NF4/FP4) weight to bf16/fp16/fp32 in one pass.

bitsandbytes dequantizes a double-quantized weight in three launches (8-bit block
constants to fp32, add the offset, then the 4-bit data). This kernel reads the packed
bytes, the 8-bit constants and the second-level constants and writes the output once.
CUDA only: import this module only where ``_backend.use_gpu_kernels`` is true.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_4bit_kernel(
    q_ptr,
    absmax_ptr,
    code2_ptr,
    absmax2_ptr,
    code_ptr,
    out_ptr,
    offset,
    n_elements,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
):
    pid = tl.program_id(0)
    byte = pid.to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    n_bytes = (n_elements + 1) // 2
    in_range = byte < n_bytes
    packed = tl.load(q_ptr + byte, mask=in_range, other=0).to(tl.int32)
    hi = (packed >> 4) & 0x0F
    lo = packed & 0x0F
    block = (byte * 2) // BLOCKSIZE  # both nibbles of a byte share a block (BLOCKSIZE is even)
    if NESTED:
        aq = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + aq) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=in_range, other=0.0)
        scale = scale + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0).to(tl.float32)
    v_hi = tl.load(code_ptr + hi) * scale
    v_lo = tl.load(code_ptr + lo) * scale
    vals = tl.interleave(v_hi, v_lo)
    elem = pid.to(tl.int64) * (2 * BLOCK_BYTES) + tl.arange(0, 2 * BLOCK_BYTES)
    tl.store(out_ptr + elem, vals.to(out_ptr.dtype.element_ty), mask=elem < n_elements)


def dequantize_4bit_triton(
    weight: torch.Tensor, quant_state: Any, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Dequantize a bitsandbytes 4-bit weight on CUDA with one Triton launch."""
    shape = tuple(int(d) for d in quant_state.shape)
    n = 1
    for d in shape:
        n *= d
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=weight.device)
    packed = weight.reshape(-1).view(torch.uint8)
    code = quant_state.code.to(device=weight.device, dtype=torch.float32)
    if quant_state.nested:
        s2 = quant_state.state2
        absmax, code2, absmax2 = quant_state.absmax, s2.code.float(), s2.absmax.float()
        offset, blocksize2, nested = float(quant_state.offset), int(s2.blocksize), True
    else:
        absmax = quant_state.absmax.float()
        code2, absmax2, offset, blocksize2, nested = absmax, absmax, 0.0, 1, False
    block_bytes = 1024
    grid = (triton.cdiv((n + 1) // 2, block_bytes),)
    _dequant_4bit_kernel[grid](
        packed,
        absmax,
        code2,
        absmax2,
        code,
        out,
        offset,
        n,
        BLOCKSIZE=int(quant_state.blocksize),
        BLOCKSIZE2=blocksize2,
        NESTED=nested,
        BLOCK_BYTES=block_bytes,
        num_warps=4,
    )
    return out
