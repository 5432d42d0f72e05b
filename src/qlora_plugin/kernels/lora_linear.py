"""One autograd function for a LoRA adapter over a frozen bitsandbytes 4-bit linear layer.

    y = x dequant(W)^T + s (x_d A^T) B^T          (x_d = dropout(x), or x itself)

PEFT computes this as ``base(x).clone() + lora_B(lora_A(dropout(x.to(adapter_dtype)))) * s``:
a copy of the output, fp32 GEMMs when the adapters are fp32, and several extra
elementwise passes, each saved for backward. Here the adapter product is added into
the base GEMM's output in place, every GEMM runs in the compute dtype, and only
``x_d`` and the rank-r product ``x_d A^T`` are saved. The adapters' master weights
keep their own dtype (fp32 by default): they are cast to the compute dtype for the
GEMMs and their gradients come back in the master dtype.

``patch_lora_4bit_layers`` swaps this in as the ``forward`` of every PEFT
``lora.bnb.Linear4bit`` that uses plain LoRA; other cases keep PEFT's forward.
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch
from torch import nn

from qlora_plugin.kernels.dequant import dequantize_4bit

DequantFn = Callable[[torch.Tensor, Any, torch.dtype], torch.Tensor]

_ORIG_FORWARD = "_qlora_fast_orig_forward"


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in fp32 (directly on CUDA where supported)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return torch.mm(a, b).float()


class LoRA4bitFunction(torch.autograd.Function):
    """Forward and backward of ``x W^T + s (x_d A^T) B^T`` with ``W`` in 4 bits.

    Inputs: ``x`` (compute dtype), ``x_lora`` (dropout of ``x``, or None for ``x``),
    ``lora_a`` [r, in] and ``lora_b`` [out, r] (any float dtype), ``scaling``,
    the packed ``weight`` with its ``quant_state``, an optional frozen ``bias`` and
    the dequantize function.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        x_lora: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        weight: torch.Tensor,
        quant_state: Any,
        bias: torch.Tensor | None,
        dequant: DequantFn,
    ) -> torch.Tensor:
        dtype = x.dtype
        lead, in_features = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, in_features)
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, in_features)
        w = dequant(weight, quant_state, dtype)
        out = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
        del w
        a = lora_a.detach().to(dtype)
        b = lora_b.detach().to(dtype)
        u = torch.mm(xl2, a.t())
        out.addmm_(u, b.t(), alpha=scaling)
        # The compute-dtype copies of A and B (r x (in + out) elements) are kept for
        # backward rather than cast again there.
        ctx.save_for_backward(xl2 if lora_a.requires_grad else None, u, a, b)
        ctx.weight, ctx.quant_state, ctx.dequant = weight, quant_state, dequant
        ctx.scaling, ctx.shared, ctx.x_shape = scaling, x_lora is None, x.shape
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return out.view(*lead, out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        xl2, u, a, b = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        dtype = g2.dtype
        s = ctx.scaling
        gu = torch.mm(g2, b).mul_(s)  # dL/du, [T, r]
        grad_a = grad_b = grad_x = grad_xl = None
        if ctx.needs_input_grad[3]:
            grad_b = _mm_fp32(g2.t(), u).mul_(s).to(ctx.b_dtype)
        if ctx.needs_input_grad[2]:
            grad_a = _mm_fp32(gu.t(), xl2).to(ctx.a_dtype)
        if ctx.needs_input_grad[0]:
            w = ctx.dequant(ctx.weight, ctx.quant_state, dtype)
            grad_x = torch.mm(g2, w)
            del w
            if ctx.shared:
                grad_x.addmm_(gu, a)
            grad_x = grad_x.view(ctx.x_shape)
        if not ctx.shared and ctx.needs_input_grad[1]:
            grad_xl = torch.mm(gu, a).view(ctx.x_shape)
        return grad_x, grad_xl, grad_a, grad_b, None, None, None, None, None


def lora_4bit_linear(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    weight: torch.Tensor,
    quant_state: Any,
    *,
    bias: torch.Tensor | None = None,
    x_lora: torch.Tensor | None = None,
    dequant: DequantFn = dequantize_4bit,
) -> torch.Tensor:
    """Functional form of :class:`LoRA4bitFunction` (autocast off inside)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return LoRA4bitFunction.apply(x, x_lora, lora_a, lora_b, scaling, weight, quant_state, bias, dequant)


def _plain_lora_adapter(layer: nn.Module) -> str | None:
    """The single active plain-LoRA adapter of a PEFT layer, or None if it needs PEFT's own path."""
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return None
    active = list(getattr(layer, "active_adapters", []))
    if len(active) != 1:
        return None
    name = active[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if getattr(layer, "use_dora", {}).get(name, False):
        return None
    if layer.lora_A[name].bias is not None or layer.lora_B[name].bias is not None:
        return None
    if getattr(layer.base_layer.weight, "quant_state", None) is None:
        return None
    return name


def _fused_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = None if (args or kwargs) else _plain_lora_adapter(self)
    if name is None:
        return getattr(self, _ORIG_FORWARD)(x, *args, **kwargs)
    base = self.base_layer
    compute_dtype = getattr(base, "compute_dtype", None) or x.dtype
    xc = x.to(compute_dtype)
    dropout = self.lora_dropout[name]
    x_lora = dropout(xc) if (self.training and not isinstance(dropout, nn.Identity)) else None
    bias = base.bias
    out = lora_4bit_linear(
        xc,
        self.lora_A[name].weight,
        self.lora_B[name].weight,
        float(self.scaling[name]),
        base.weight,
        base.weight.quant_state,
        bias=None if bias is None else bias.detach(),
        x_lora=x_lora,
    )
    return out if out.dtype == x.dtype else out.to(x.dtype)


def is_lora_4bit_layer(module: nn.Module) -> bool:
    """True for PEFT's LoRA wrapper around a bitsandbytes ``Linear4bit``."""
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError:  # peft without bitsandbytes support
        return False
    return isinstance(module, LoraLinear4bit)


def patch_lora_4bit_layers(model: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Route every PEFT LoRA-over-4-bit layer of ``model`` through the fused function.

    Returns how many layers were patched. Layers whose name ends in one of ``skip``
    are left alone. Layers that use DoRA, several adapters, merged weights or
    mixed-adapter batches fall back to PEFT's forward per call.
    """
    n = 0
    for name, module in model.named_modules():
        if skip and name.rsplit(".", 1)[-1] in skip:
            continue
        if is_lora_4bit_layer(module) and not hasattr(module, _ORIG_FORWARD):
            setattr(module, _ORIG_FORWARD, module.forward)
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n


def unpatch_lora_4bit_layers(model: nn.Module) -> int:
    """Undo :func:`patch_lora_4bit_layers`; returns how many layers were restored."""
    n = 0
    for module in model.modules():
        if hasattr(module, _ORIG_FORWARD):
            del module.forward
            delattr(module, _ORIG_FORWARD)
            n += 1
    return n
