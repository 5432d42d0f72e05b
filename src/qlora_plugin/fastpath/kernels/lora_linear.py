"""One autograd function for a LoRA adapter over a frozen bitsandbytes 4-bit linear layer.

    y = x dequant(W)^T + s (x_d A^T) B^T          (x_d = dropout(x), or x itself)

PEFT computes this as ``base(x).clone() + lora_B(lora_A(dropout(x.to(adapter_dtype)))) * s``:
a copy of the output, fp32 GEMMs when the adapters are fp32, and several extra
elementwise passes, each saved for backward. Here the adapter product is added into
the base GEMM's output in place, every GEMM runs in the compute dtype, dropout is
drawn inside the function (its gradient is added into the input gradient in one
pass), and only ``x_d`` (with the dropout mask) and the rank-r product ``x_d A^T``
are saved. On CUDA the dropout is drawn inside Triton kernels that keep the mask as
bits and never write ``x_d`` (:mod:`lora_dropout`); ``x`` itself is saved instead.
The adapters' master weights keep their own dtype (fp32 by default): their
compute-dtype copies are made for all layers at once, in one batched copy per model
forward (:class:`AdapterCopies`), and their gradients come back in the master dtype.

``patch_lora_4bit_layers`` swaps this in as the ``forward`` of every PEFT
``lora.bnb.Linear4bit`` that uses plain LoRA; other cases keep PEFT's forward.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qlora_plugin.core.patches import allowed
from qlora_plugin.fastpath.kernels.dequant import DequantFn, dequantize_4bit
from qlora_plugin.fastpath.kernels.kept_outputs import offer_output, reusable_output
from qlora_plugin.fastpath.kernels.lora_dropout import use_triton_dropout

_ORIG_FORWARD = "_qlora_fast_orig_forward"
_COPIES = "_qlora_adapter_copies"
_COPIES_HOOK = "_qlora_adapter_copies_hook"
_OPTIONS = "_qlora_layer_options"


@dataclass(frozen=True)
class LayerOptions:
    """How the fused layers of one model compute (kept per model, never process-wide).

    dequant: the function that turns a 4-bit weight into the compute dtype.
    triton_dropout: draw LoRA dropout inside the Triton kernels on CUDA (False: torch's dropout).
    """

    dequant: DequantFn = field(default=dequantize_4bit)
    triton_dropout: bool = True


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

    Inputs: ``x`` (compute dtype), the dropout probability ``p`` (``x_d`` is ``x``
    when 0), ``lora_a`` [r, in] and ``lora_b`` [out, r] (any float dtype) with
    optional compute-dtype copies of them, ``scaling``, the packed ``weight`` with
    its ``quant_state``, an optional frozen ``bias``, the dequantize function,
    whether dropout may be drawn inside the Triton kernels, and ``reuse``: this
    layer's output as its checkpointed layer's first forward computed it (the
    recompute then draws the dropout mask and the down-product again, which backward
    needs, and skips the dequantization and the GEMM; see :mod:`kept_outputs`).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        p: float,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        a_copy: torch.Tensor | None,
        b_copy: torch.Tensor | None,
        scaling: float,
        weight: torch.Tensor,
        quant_state: Any,
        bias: torch.Tensor | None,
        dequant: DequantFn,
        triton_dropout: bool,
        reuse: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = x.dtype
        lead, in_features = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, in_features)
        a = a_copy if a_copy is not None and a_copy.dtype == dtype else lora_a.detach().to(dtype)
        b = b_copy if b_copy is not None and b_copy.dtype == dtype else lora_b.detach().to(dtype)
        packed = p > 0.0 and use_triton_dropout(x2, triton_dropout)
        mask: torch.Tensor | None
        if packed:  # the mask is drawn in-kernel and kept as bits; backward reads x and the bits
            from qlora_plugin.fastpath.kernels.triton_lora_dropout import dropout_down

            u, mask = dropout_down(x2, a, p)
            xl2 = x2
        else:
            xl2, mask = torch.native_dropout(x2, p, True) if p > 0.0 else (x2, None)
            u = torch.mm(xl2, a.t())
        if reuse is not None:
            out = reuse
        else:
            w = dequant(weight, quant_state, dtype)
            out = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
            del w
            out.addmm_(u, b.t(), alpha=scaling)
        # The compute-dtype copies of A and B (r x (in + out) elements) are kept for
        # backward rather than cast again there.
        ctx.save_for_backward(xl2 if lora_a.requires_grad else None, u, a, b, mask)
        ctx.weight, ctx.quant_state, ctx.dequant = weight, quant_state, dequant
        ctx.scaling, ctx.p, ctx.x_shape, ctx.packed = scaling, p, x.shape, packed
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return out.view(*lead, out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xl2, u, a, b, mask = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        dtype = g2.dtype
        s = ctx.scaling
        gu = torch.mm(g2, b).mul_(s)  # dL/du, [T, r]
        grad_a = grad_b = grad_x = None
        if ctx.needs_input_grad[3]:
            grad_b = _mm_fp32(g2.t(), u).mul_(s).to(ctx.b_dtype)
        if ctx.packed:
            from qlora_plugin.fastpath.kernels.triton_lora_dropout import dropout_add_grad_x, dropout_grad_a
        if ctx.needs_input_grad[2]:
            if ctx.packed:
                grad_a = dropout_grad_a(gu, xl2, mask, ctx.p).to(ctx.a_dtype)
            else:
                grad_a = _mm_fp32(gu.t(), xl2).to(ctx.a_dtype)
        if ctx.needs_input_grad[0]:
            w = ctx.dequant(ctx.weight, ctx.quant_state, dtype)
            grad_x = torch.mm(g2, w)
            del w
            if mask is None:
                grad_x.addmm_(gu, a)
            elif ctx.packed:
                dropout_add_grad_x(grad_x, gu, a, mask, ctx.p)
            else:  # through the dropout: the kept elements, scaled by 1 / (1 - p)
                grad_x.addcmul_(torch.mm(gu, a), mask, value=1.0 / (1.0 - ctx.p))
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, None, grad_a, grad_b, None, None, None, None, None, None, None, None, None


def lora_4bit_linear(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    weight: torch.Tensor,
    quant_state: Any,
    *,
    bias: torch.Tensor | None = None,
    dropout: float = 0.0,
    a_copy: torch.Tensor | None = None,
    b_copy: torch.Tensor | None = None,
    dequant: DequantFn = dequantize_4bit,
    triton_dropout: bool = True,
    reuse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Functional form of :class:`LoRA4bitFunction` (autocast off inside).

    ``dropout``: probability of LoRA dropout on the adapter's input (training only:
    pass 0 in eval). ``a_copy``/``b_copy``: ready compute-dtype copies of the adapters.
    ``reuse``: the output the same call computed before (rows x out, compute dtype).
    """
    args = (
        x,
        float(dropout),
        lora_a,
        lora_b,
        a_copy,
        b_copy,
        scaling,
        weight,
        quant_state,
        bias,
        dequant,
        triton_dropout,
        reuse,
    )
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return LoRA4bitFunction.apply(*args)
    return LoRA4bitFunction.apply(*args)


class AdapterCopies:
    """Compute-dtype copies of the LoRA weights of the fused layers, one batched copy per forward.

    Casting every A and B on its own costs a launch and host time per matrix per
    forward. :meth:`refresh` (a forward pre-hook on the model's decoder) copies all of
    them at once into fresh buffers; a layer takes its copy only while the master's
    version is the one copied, else it casts its own. Fresh buffers each time keep the
    copies saved for an earlier forward's backward intact.
    """

    def __init__(self, masters: list[torch.Tensor], dtype: torch.dtype) -> None:
        self.masters = [m for m in masters if m.dtype != dtype]
        self.dtype = dtype
        self.copies: dict[int, tuple[torch.Tensor, int]] = {}

    def refresh(self, *_: Any) -> None:
        """Copy every master to ``dtype`` now (one foreach copy per device)."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for m in self.masters:
            by_device.setdefault(m.device, []).append(m)
        copies: dict[int, tuple[torch.Tensor, int]] = {}
        with torch.no_grad():
            for device, masters in by_device.items():
                flat = torch.empty(sum(m.numel() for m in masters), dtype=self.dtype, device=device)
                pieces = flat.split([m.numel() for m in masters])
                views = [v.view(m.shape) for v, m in zip(pieces, masters, strict=True)]
                torch._foreach_copy_(views, masters)
                copies.update({id(m): (v, m._version) for m, v in zip(masters, views, strict=False)})
        self.copies = copies

    def get(self, master: torch.Tensor) -> torch.Tensor | None:
        """The copy of ``master`` made at the last refresh, if ``master`` has not changed since."""
        entry = self.copies.get(id(master))
        if entry is None or entry[1] != master._version:
            return None
        return entry[0]


def _plain_lora_adapter(layer: Any) -> str | None:
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
    state = getattr(layer.base_layer.weight, "quant_state", None)
    if state is None:
        return None
    if getattr(state, "packing_format_for_cpu", False):  # repacked by bitsandbytes before the fast path met it
        from qlora_plugin.build.quantization import restore_nf4_layout  # bitsandbytes, which loads Triton

        restore_nf4_layout(layer.base_layer)
    return name


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = None if (args or kwargs) else _plain_lora_adapter(self)
    if name is None:
        return getattr(self, _ORIG_FORWARD)(x, *args, **kwargs)
    base = self.base_layer
    compute_dtype = getattr(base, "compute_dtype", None) or x.dtype
    xc = x if x.dtype == compute_dtype else x.to(compute_dtype)
    dropout = self.lora_dropout[name]
    p = float(dropout.p) if (self.training and isinstance(dropout, nn.Dropout)) else 0.0
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    copies: AdapterCopies | None = self.__dict__.get(_COPIES)
    options: LayerOptions = self.__dict__.get(_OPTIONS) or LayerOptions()
    bias = base.bias
    rows = xc.numel() // max(xc.shape[-1], 1)
    reuse = reusable_output(self, rows, lora_b.shape[0], compute_dtype)
    out = lora_4bit_linear(
        xc,
        lora_a,
        lora_b,
        float(self.scaling[name]),
        base.weight,
        base.weight.quant_state,
        bias=None if bias is None else bias.detach(),
        dropout=p,
        a_copy=None if copies is None else copies.get(lora_a),
        b_copy=None if copies is None else copies.get(lora_b),
        dequant=options.dequant,
        triton_dropout=options.triton_dropout,
        reuse=reuse,
    )
    if reuse is None:
        offer_output(self, out)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def is_lora_4bit_layer(module: nn.Module) -> bool:
    """True for PEFT's LoRA wrapper around a bitsandbytes ``Linear4bit``."""
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError:  # peft without bitsandbytes support
        return False
    return isinstance(module, LoraLinear4bit)


def patch_lora_4bit_layers(
    model: nn.Module,
    skip: tuple[str, ...] = (),
    compute_dtype: torch.dtype | None = None,
    options: LayerOptions | None = None,
) -> int:
    """Route every PEFT LoRA-over-4-bit layer of ``model`` through the fused function.

    Returns how many layers were patched (0 where PEFT or bitsandbytes is outside the
    versions this was tested on, see :mod:`qlora_plugin.core.patches`). Layers whose name
    ends in one of ``skip`` are left alone. Layers that use DoRA, several adapters,
    merged weights or mixed-adapter batches fall back to PEFT's forward per call. With
    ``compute_dtype``, the adapters' copies in that dtype are made once per forward of
    the model's decoder (:class:`AdapterCopies`). ``options``: this model's
    :class:`LayerOptions`. The 4-bit base layers keep their NF4 layout on any CPU.
    """
    from qlora_plugin.build.quantization import keep_nf4_layout  # bitsandbytes, which loads Triton

    if not (allowed("peft-lora-4bit-forward") and allowed("bnb-quant-state")):
        return 0
    patched = []
    for name, module in model.named_modules():
        if skip and name.rsplit(".", 1)[-1] in skip:
            continue
        if is_lora_4bit_layer(module) and not hasattr(module, _ORIG_FORWARD):
            keep_nf4_layout(module.base_layer)
            setattr(module, _ORIG_FORWARD, module.forward)
            module.forward = types.MethodType(_fused_forward, module)
            if options is not None:
                module.__dict__[_OPTIONS] = options
            patched.append(module)
    if patched and compute_dtype is not None:
        masters = [p for m in patched for d in (m.lora_A, m.lora_B) for lin in d.values() for p in lin.parameters()]
        copies = AdapterCopies(masters, compute_dtype)
        if copies.masters:
            decoder = getattr(model, "model", None)
            decoder = decoder if isinstance(decoder, nn.Module) else model
            model.__dict__[_COPIES_HOOK] = decoder.register_forward_pre_hook(copies.refresh)
            model.__dict__[_COPIES] = copies
            for module in patched:
                module.__dict__[_COPIES] = copies
    return len(patched)


def unpatch_lora_4bit_layers(model: nn.Module) -> int:
    """Undo :func:`patch_lora_4bit_layers`; returns how many layers were restored."""
    n = 0
    hook = model.__dict__.pop(_COPIES_HOOK, None)
    if hook is not None:
        hook.remove()
    for module in model.modules():
        module.__dict__.pop(_COPIES, None)
        module.__dict__.pop(_OPTIONS, None)
        if hasattr(module, _ORIG_FORWARD):
            del module.forward
            delattr(module, _ORIG_FORWARD)
            n += 1
    return n
