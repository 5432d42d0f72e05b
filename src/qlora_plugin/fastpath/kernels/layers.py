"""RMSNorm and SwiGLU MLP forwards that save less for backward (Liger on CUDA).

Patched per module instance, never per class, so other models in the process are
untouched. On CUDA with Liger installed: Liger's RMSNorm (saves the input and one
rstd per row instead of HF's fp32 copies) and SiLU-times-up (recomputes the SiLU in
backward instead of saving it). Elsewhere: plain PyTorch with HF's numerics. A SwiGLU
MLP over a long row runs in slices of tokens (:mod:`tiled_mlp`).
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qlora_plugin.core.patches import allowed
from qlora_plugin.fastpath.kernels._backend import use_liger
from qlora_plugin.fastpath.kernels.tiled_mlp import mlp_forward

_ORIG_FORWARD = "_qlora_fast_orig_forward"

# RMSNorm classes that compute w * (x / rms(x)).to(dtype) (Llama's, no offset).
_LLAMA_STYLE_NORMS = frozenset(
    {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm", "MixtralRMSNorm"}
)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm: fp32 statistics, normalised input cast back before the weight."""
    if use_liger(x):
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        # in place: dX is written into dY's buffer, which nothing else reads in these models
        return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", True)
    return rms_norm_reference(x, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain-PyTorch Llama RMSNorm."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``; on CUDA the SiLU is recomputed in backward, not saved."""
    if use_liger(gate):
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply(gate, up)
    return F.silu(gate) * up


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q and k (HF layout [B, H, S, D]); Liger's kernel on CUDA."""
    if use_liger(q) and unsqueeze_dim == 1:
        from liger_kernel.ops.rope import LigerRopeFunction

        return LigerRopeFunction.apply(q, k, cos, sin, None, unsqueeze_dim)
    return rotary_reference(q, k, cos, sin, unsqueeze_dim)


def rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch rotary embedding (rotate-half convention, as Llama)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


_ROPE_MODULES = ("llama", "mistral", "qwen2", "qwen3")
_ROPE_FORWARD = "_qlora_rope_forward"


def patch_rope(model: nn.Module) -> int:
    """Route the rotary embedding of ``model``'s Llama-family attention modules through :func:`rotary`.

    transformers' attention forward looks ``apply_rotary_pos_emb`` up in its modeling
    module's globals at call time. Each attention module of ``model`` gets, as its own
    ``forward``, the class's forward code bound to a copy of those globals in which that
    name is :func:`rotary` (same math; non-CUDA tensors take the reference path). The
    modeling module itself and every other model are untouched. Returns modules patched.
    """
    if not allowed("transformers-rope-function"):
        return 0
    n = 0
    for module in model.modules():
        cls = type(module)
        family = cls.__module__.rsplit(".", 1)[-1].replace("modeling_", "")
        if not cls.__name__.endswith("Attention") or family not in _ROPE_MODULES or _ROPE_FORWARD in module.__dict__:
            continue
        forward = _forward_with_rotary(cls)
        if forward is None:
            continue
        module.__dict__[_ROPE_FORWARD] = True
        module.forward = types.MethodType(forward, module)
        n += 1
    return n


_ROPE_FORWARDS: dict[type, Any] = {}


def _forward_with_rotary(cls: type[Any]) -> Any:
    """``cls.forward`` with ``apply_rotary_pos_emb`` resolved to :func:`rotary`, or None if it uses no such name."""
    if cls not in _ROPE_FORWARDS:
        original = cls.forward
        code = getattr(original, "__code__", None)
        if code is None or "apply_rotary_pos_emb" not in code.co_names:
            _ROPE_FORWARDS[cls] = None
        else:
            scope = {**original.__globals__, "apply_rotary_pos_emb": rotary}
            forward = types.FunctionType(code, scope, original.__name__, original.__defaults__, original.__closure__)
            forward.__kwdefaults__ = original.__kwdefaults__
            forward.__qualname__ = original.__qualname__
            _ROPE_FORWARDS[cls] = forward
    return _ROPE_FORWARDS[cls]


def _norm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def swiglu_mlp(self: Any, x: torch.Tensor) -> torch.Tensor:
    """A SwiGLU MLP module's computation, ``down(silu(gate(x)) * up(x))``, through :func:`silu_mul`."""
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _swiglu_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    # long rows run in slices of tokens (tiled_mlp); everything else in one call
    return mlp_forward(self, x, functools.partial(swiglu_mlp, self))


def patched_mlps(model: nn.Module) -> list[nn.Module]:
    """The MLP modules of ``model`` that run the SwiGLU forward of :func:`patch_norms_and_mlps`."""
    return [m for m in model.modules() if getattr(m.forward, "__func__", None) is _swiglu_forward]


def _is_swiglu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    has_proj = all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj"))
    is_silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return has_proj and is_silu and type(module).__name__.endswith("MLP")


def patch_norms_and_mlps(model: nn.Module, mlps: bool = True) -> tuple[int, int]:
    """Patch Llama-style RMSNorm and (with ``mlps``) SwiGLU MLP modules; returns (norms, mlps) patched."""
    if not allowed("transformers-norm-mlp-forward"):
        return 0, 0
    norms = swiglus = 0
    for module in model.modules():
        if hasattr(module, _ORIG_FORWARD):
            continue
        if type(module).__name__ in _LLAMA_STYLE_NORMS and hasattr(module, "variance_epsilon"):
            setattr(module, _ORIG_FORWARD, module.forward)
            module.forward = types.MethodType(_norm_forward, module)
            norms += 1
        elif mlps and _is_swiglu_mlp(module):
            setattr(module, _ORIG_FORWARD, module.forward)
            module.forward = types.MethodType(_swiglu_forward, module)
            swiglus += 1
    return norms, swiglus
