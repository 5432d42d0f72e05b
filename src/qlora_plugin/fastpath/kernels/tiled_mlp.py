"""Tiled MLP: a decoder layer's MLP over long rows, one slice of tokens at a time.

A gated MLP's intermediates are ``intermediate / hidden`` times wider than its input
(3.5x at Llama-3.1-8B): for a 262,144-token row the gate, up and product tensors are
7.5 GB each in bf16, and their backward holds four of them at once, whatever the
decoder-layer recompute does around the MLP. The MLP treats every token on its own,
so it can run over slices of the sequence: :class:`TiledMLPFunction` computes each
slice's output without keeping anything for backward but the MLP's input and the
random-number state each slice started from, and in backward recomputes one slice at a
time, differentiates it, and accumulates the input gradient and the adapters' gradients.
Only one slice's intermediates live at once, in forward and in backward.

Without dropout the result is the untiled MLP's: the same products, the adapters'
gradients summed slice by slice. With LoRA dropout each slice draws its own masks (the
distribution of one draw over the whole row, not the same bits), and backward restores
each slice's CPU and CUDA generator state before recomputing it, as torch's checkpointing
does for a whole layer, so the recomputed slice uses exactly the masks its forward used.
The cost is one more forward of the MLP per step (the slices' recompute); at these
lengths attention dominates the step.

The idea of tiling the MLP along the sequence is the one behind sequence tiling in
ALST/Arctic Long Sequence Training (arXiv:2506.13996); this implementation is our own.

:func:`tiling_rows` says when a call is tiled (``TiledMLPOptions`` on the MLP module:
rows of at least ``min_tokens`` tokens, slices of ``rows`` tokens); :func:`mlp_forward`
is the entry point the fast path's SwiGLU forward calls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qlora_plugin.fastpath.kernels.kept_outputs import suspended
from qlora_plugin.fastpath.tiling_defaults import TILED_MLP_MIN_TOKENS, TILED_MLP_ROWS

OPTIONS = "_qlora_tiled_mlp"
_log = logging.getLogger("qlora_plugin")


@dataclass
class TiledMLPOptions:
    """When one model's MLPs are tiled (shared by its MLP modules).

    rows: tokens per slice. min_tokens: tile calls with at least this many tokens
    (batch x sequence); 0 turns tiling off. ``announced``: the one log line was written.
    ``calls``: tiled calls so far, and ``slices``: the slice count of the last one.
    """

    rows: int = TILED_MLP_ROWS
    min_tokens: int = TILED_MLP_MIN_TOKENS
    announced: bool = False
    calls: int = 0
    slices: int = 0


def tiling_rows(options: TiledMLPOptions | None, tokens: int) -> int:
    """Tokens per slice for an MLP call over ``tokens`` tokens, or 0 when the call is not tiled."""
    if options is None or options.min_tokens <= 0 or options.rows <= 0 or tokens < options.min_tokens:
        return 0
    return options.rows if tokens > options.rows else 0


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class TiledMLPFunction(torch.autograd.Function):
    """``run(x)`` computed over slices of ``rows`` tokens, each recomputed alone in backward.

    Inputs: ``run`` (the MLP as a function of its input), ``rows``, ``x`` [..., hidden]
    and the MLP's trainable parameters (``params``), whose gradients are returned.
    """

    @staticmethod
    def forward(
        ctx: Any, run: Callable[[torch.Tensor], torch.Tensor], rows: int, x: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        states: list[tuple[torch.Tensor, torch.Tensor | None]] = []

        def run_slice(piece: torch.Tensor) -> torch.Tensor:
            states.append(_rng_state(x.device))
            return run(piece)

        with torch.no_grad():
            out = _by_slices(run_slice, x.reshape(-1, x.shape[-1]), rows)
        ctx.run, ctx.rows, ctx.states, ctx.params = run, rows, states, params  # parameters: leaves, kept by reference
        ctx.save_for_backward(x)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        params = [p for p, needs in zip(ctx.params, ctx.needs_input_grad[3:], strict=True) if needs]
        flat = x.detach().reshape(-1, x.shape[-1])
        grad_flat = grad.reshape(-1, grad.shape[-1])
        grad_x = torch.empty_like(flat) if ctx.needs_input_grad[2] else None
        sums: list[torch.Tensor | None] = [None] * len(params)
        devices = [x.device] if x.device.type == "cuda" else []
        for i, start in enumerate(range(0, flat.shape[0], ctx.rows)):
            piece = flat[start : start + ctx.rows].detach().requires_grad_(grad_x is not None)
            cpu_state, cuda_state = ctx.states[i]
            with torch.random.fork_rng(devices=devices):
                torch.set_rng_state(cpu_state)
                if cuda_state is not None:
                    torch.cuda.set_rng_state(cuda_state, x.device)
                with torch.enable_grad():
                    out = ctx.run(piece)
            wrt = ([piece] if grad_x is not None else []) + params
            grads = torch.autograd.grad(out, wrt, grad_flat[start : start + ctx.rows], allow_unused=True)
            del out
            if grad_x is not None:
                grad_x[start : start + ctx.rows] = grads[0]
                grads = grads[1:]
            for j, g in enumerate(grads):
                total = sums[j]
                if g is not None:
                    sums[j] = g if total is None else total.add_(g)
        ctx.states = ctx.params = None
        by_param = iter(sums)
        param_grads = [next(by_param) if needs else None for needs in ctx.needs_input_grad[3:]]
        return (None, None, None if grad_x is None else grad_x.view(x.shape), *param_grads)


def tiled_mlp(
    run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: Sequence[torch.Tensor], rows: int
) -> torch.Tensor:
    """``run(x)`` over slices of ``rows`` tokens (see the module docstring); ``params``: ``run``'s trainable parameters.

    Without gradients the slices simply run one after another (nothing to keep).
    """
    if not torch.is_grad_enabled():
        out = _by_slices(run, x.reshape(-1, x.shape[-1]), rows)
        return out.view(*x.shape[:-1], out.shape[-1])
    return TiledMLPFunction.apply(run, rows, x, *params)


def _by_slices(run: Callable[[torch.Tensor], torch.Tensor], flat: torch.Tensor, rows: int) -> torch.Tensor:
    """``run`` over slices of ``rows`` rows of ``flat``, written into one output (no concatenation copy)."""
    first = run(flat[:rows])
    if flat.shape[0] <= rows:
        return first
    out = first.new_empty((flat.shape[0], *first.shape[1:]))
    out[:rows] = first
    del first
    for start in range(rows, flat.shape[0], rows):
        out[start : start + rows] = run(flat[start : start + rows])
    return out


def chunked_mlp_reference(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: int) -> torch.Tensor:
    """The same slices as :func:`tiled_mlp` through plain autograd (keeps every slice's activations; for tests)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.cat([run(flat[s : s + rows]) for s in range(0, flat.shape[0], rows)])
    return out.view(*x.shape[:-1], out.shape[-1])


def mlp_forward(module: nn.Module, x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``run(x)`` for the MLP ``module``: tiled when its :class:`TiledMLPOptions` say so, else directly."""
    options: TiledMLPOptions | None = module.__dict__.get(OPTIONS)
    tokens = x.numel() // x.shape[-1] if x.dim() else 0
    rows = tiling_rows(options, tokens)
    if not rows:
        return run(x)
    assert options is not None  # tiling_rows returns 0 without options
    options.calls += 1
    options.slices = -(-tokens // rows)
    if not options.announced:
        options.announced = True
        _log.info(
            "qlora fast path: rows of %d tokens: each decoder layer's MLP runs in %d slices of %d tokens "
            "(tiled MLP, from %d tokens on; one more MLP forward per step, far less memory)",
            tokens,
            options.slices,
            rows,
            options.min_tokens,
        )
    params = [p for p in module.parameters() if p.requires_grad]
    with suspended():  # a tiled call's slices would keep the whole row's intermediates
        return tiled_mlp(run, x, params, rows)


def enable_tiled_mlp(mlps: Sequence[nn.Module], options: TiledMLPOptions) -> int:
    """Give ``mlps`` (patched SwiGLU MLP modules of one model) ``options``; returns how many got them."""
    for mlp in mlps:
        mlp.__dict__[OPTIONS] = options
    return len(mlps) if options.min_tokens > 0 else 0


def tiled_options(module: nn.Module) -> TiledMLPOptions | None:
    """The :class:`TiledMLPOptions` of an MLP module, or of the first MLP inside ``module`` (a decoder layer)."""
    for m in module.modules():
        options = m.__dict__.get(OPTIONS)
        if options is not None:
            return options
    return None
