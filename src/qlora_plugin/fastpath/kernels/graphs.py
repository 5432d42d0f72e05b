"""CUDA graphs over the decoder layers, for steps whose time goes to launching kernels.

A small model's step is bound by the host: launching the fast path's kernels takes about
as long as running them, and a trainer that reads a scalar back in the middle of the
step (TRL does, for its token count) lays the two end to end. Replaying each decoder
layer's forward and backward as one CUDA graph takes the launches off the host
(measurements: docs/performance.md).

``DecoderGraphs`` wraps the layers of one decoder. A training forward whose inputs
have the same shape as the previous one (fixed-length batches: packing, padding to a
fixed length, a benchmark) is captured once with
``torch.cuda.make_graphed_callables`` (all layers in one memory pool) and replayed
from then on. Anything else runs eagerly: inference, no-grad, caches, attention
masks or extra tensor arguments, hooks on the layers, and a second forward before the
first one's backward (a replay would overwrite what that backward still needs).
Dropout (LoRA or attention) is captured too: each replay draws new masks. The
capture differentiates with respect to stand-ins of the trainable parameters (see
:class:`LayerCall`), so a loss of an earlier step kept alive does not invalidate it.
A capture that fails anyway leaves the layers eager, or, where it left the CUDA
random number generator unusable and the layers need it, stops with an error that
names the switch (``QLORA_CUDA_GRAPHS=0``). The first batch of a different
shape drops the graphs for good (a dataset of varying lengths would otherwise hold
one set of activations per shape), so graphs never cost more than one step's
activations.
"""

from __future__ import annotations

import logging
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from qlora_plugin.core.patches import allowed
from qlora_plugin.fastpath.kernels.attention import SDPA_IMPLEMENTATIONS, batch_is_packed
from qlora_plugin.fastpath.kernels.tiled_mlp import tiled_options, tiling_rows

_EAGER_FORWARD = "_qlora_eager_forward"
_GRAPHS = "_qlora_decoder_graphs"
# Tensor arguments a decoder layer call may carry without changing what the layer computes:
# positions are already in the position embeddings, and Trainer's token count is for the loss.
_LAYER_NEUTRAL_KWARGS = ("position_ids", "cache_position", "num_items_in_batch")
_log = logging.getLogger("qlora_plugin")


class LayerCall(nn.Module):
    """A decoder layer as a function of tensors only, its trainable parameters passed in.

    ``forward`` is the layer's own forward (not its ``__call__``, which a wrapper may route).

    ``make_graphed_callables`` is given :meth:`function`, not the module: the capture then
    differentiates with respect to stand-ins for the trainable parameters (new leaves on
    the same storage), not the parameters themselves. A parameter's own gradient
    accumulator may still belong to an earlier forward's graph (a loss kept alive, a
    wrapper that holds the accumulators), made on the default stream: using it inside the
    capture would tie the default stream to the capturing one, which invalidates the
    capture. On replay the real parameters are passed; their gradients are accumulated
    outside the graph.
    """

    def __init__(self, layer: nn.Module, forward: Callable[..., Any]) -> None:
        super().__init__()
        self.layer = layer
        self.layer_forward = forward
        self.names = [f"layer.{name}" for name, p in layer.named_parameters() if p.requires_grad]
        self.params: list[torch.Tensor] = [p for p in layer.parameters() if p.requires_grad]

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.layer_forward(hidden, attention_mask=None, position_embeddings=(cos, sin))

    def function(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        """The layer with ``params`` in place of its trainable parameters."""
        return torch.func.functional_call(self, dict(zip(self.names, params, strict=False)), (hidden, cos, sin))

    def stand_ins(self) -> list[torch.Tensor]:
        """New leaves sharing the trainable parameters' storage (replays then copy nothing)."""
        return [p.detach().requires_grad_(True) for p in self.params]


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule has a forward or backward hook (a graph would skip it)."""
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in module.modules()
    )


def draws_random_numbers(layers: list[nn.Module]) -> bool:
    """Whether a training forward of ``layers`` uses dropout (LoRA dropout or attention dropout)."""
    for module in nn.ModuleList(layers).modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            return True
        if float(getattr(module, "attention_dropout", 0.0) or 0.0) > 0:
            return True
    return False


def generator_works(device: torch.device) -> bool:
    """Whether the CUDA generator still draws outside a capture (a failed capture can leave it broken)."""
    try:
        torch.empty(1, device=device).bernoulli_(0.5)
        return True
    except RuntimeError:
        return False


def global_hooks() -> bool:
    """Whether a module hook is registered for every module (a graph would skip it)."""
    return bool(
        torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
        or torch_module._global_backward_hooks
        or torch_module._global_backward_pre_hooks
    )


def why_eager(
    layer0: nn.Module, model: nn.Module | None, hidden: torch.Tensor, mask: Any, kwargs: dict[str, Any], emb: Any
) -> str:
    """Why a decoder's layer-0 call cannot be a graph replay ("" when it can): what a graph cannot
    hold (an attention mask, a cache, packed rows whose boundaries move, a tiled MLP, tensor
    arguments beyond the neutral ones) or a call that is not a training forward with gradients."""
    if not (torch.is_grad_enabled() and layer0.training):
        return "not a training forward with grad"
    if mask is not None:
        return "an attention mask"
    if tiling_rows(tiled_options(layer0), hidden.numel() // hidden.shape[-1]):
        return "long rows (the MLP runs tiled, recomputing inside its own backward)"
    if emb is None or kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
        return "a cache or no position embeddings"
    if model is not None and batch_is_packed(model, kwargs.get("position_ids")):
        return "packed sequences (their boundaries change from batch to batch)"
    extra = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in _LAYER_NEUTRAL_KWARGS]
    return f"tensor arguments {extra}" if extra else ""


def capture_failure(error: Exception, what: str, layers: list[nn.Module], device: torch.device) -> str:
    """Why capturing ``what`` failed, said once in a warning (the layers then run without graphs).

    A failed capture can leave the CUDA generator unusable; where ``layers`` draw random numbers
    (dropout) that stops the run here, with the switch that avoids the capture named.
    """
    reason = f"capture failed: {type(error).__name__}: {error}"
    _log.warning("qlora fast path: CUDA graphs off for %s (%s); they run without graphs", what, reason)
    if draws_random_numbers(layers) and not generator_works(device):
        raise RuntimeError(
            f"qlora fast path: capturing {what} as CUDA graphs failed and left the CUDA random number "
            f"generator unusable, so dropout cannot run ({reason}). "
            "Set QLORA_CUDA_GRAPHS=0 to train without CUDA graphs."
        ) from error
    return reason


class PendingBackward:
    """The backward of the last replayed forward, from its layer 0's output, until it has run (or its
    graph is freed): a replay before then would overwrite what that backward still reads."""

    def __init__(self) -> None:
        self._node: weakref.ref[Any] | None = None
        self._done = True

    def watch(self, out: Any) -> None:
        node = (out[0] if isinstance(out, tuple) else out).grad_fn
        self._node, self._done = (None, True) if node is None else (weakref.ref(node), False)
        if node is not None:
            node.register_hook(self._mark_done)

    def _mark_done(self, *_: Any) -> None:
        self._done = True

    def waiting(self) -> bool:
        return self._node is not None and not self._done and self._node() is not None


class DecoderGraphs:
    """Captures and replays the decoder layers of one model (see the module docstring)."""

    def __init__(self, layers: list[nn.Module], adapter_copies: Any = None, model: nn.Module | None = None) -> None:
        self.layers = layers
        self.model = weakref.ref(model) if model is not None else None
        self.adapter_copies = adapter_copies
        self.graphed: list[Any] | None = None
        self.calls: list[LayerCall] = []
        self.key: tuple[Any, ...] | None = None
        self.last_key: tuple[Any, ...] | None = None
        self.disabled_because = ""
        self.eager_because = ""
        self.replays = 0
        self._replaying = False
        self.pending = PendingBackward()  # layer 0's backward of the last replay

    def _key(self, hidden: torch.Tensor, mask: Any, kwargs: dict[str, Any], emb: Any) -> tuple[Any, ...] | None:
        """The graph key of a layer-0 call, or None (and ``eager_because``) when it must run eagerly."""
        model = self.model() if self.model is not None else None
        self.eager_because = why_eager(self.layers[0], model, hidden, mask, kwargs, emb)
        if not self.eager_because and not hidden.is_cuda:
            self.eager_because = "not on CUDA"
        if self.eager_because:
            return None
        cos, sin = emb
        return (tuple(hidden.shape), hidden.dtype, hidden.requires_grad, tuple(cos.shape), cos.dtype)

    def _capture(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        if has_hooks(nn.ModuleList(self.layers)) or global_hooks():
            self.disabled_because = "hooks on the decoder layers"
            return
        self.calls = [LayerCall(layer, getattr(layer, _EAGER_FORWARD)) for layer in self.layers]
        samples = []
        for i, call in enumerate(self.calls):
            h = hidden.detach().clone().requires_grad_(hidden.requires_grad if i == 0 else True)
            samples.append((h, cos.detach().clone(), sin.detach().clone(), *call.stand_ins()))
        saved_copies = None
        if self.adapter_copies is not None:  # a graph must cast the live adapters, not one forward's copies
            saved_copies, self.adapter_copies.copies = self.adapter_copies.copies, {}
        try:
            with torch.autocast("cuda", enabled=False):
                functions = tuple(call.function for call in self.calls)
                self.graphed = list(torch.cuda.make_graphed_callables(functions, tuple(samples)))
        except Exception as error:  # noqa: BLE001 - any capture failure leaves the eager path in place
            self.graphed, self.calls = None, []
            self.disabled_because = capture_failure(error, "the decoder layers", self.layers, hidden.device)
        finally:
            if saved_copies is not None:
                self.adapter_copies.copies = saved_copies

    def drop(self, reason: str) -> None:
        """Free the graphs and run eagerly from now on."""
        self.graphed, self.calls, self.key, self.disabled_because = None, [], None, reason
        torch.cuda.empty_cache()

    def layer_forward(self, index: int, layer: nn.Module, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Forward of decoder layer ``index``: a graph replay when this forward is graphed, else eager."""
        eager = getattr(layer, _EAGER_FORWARD)
        if self.disabled_because or args:
            return eager(hidden, *args, **kwargs)
        if index == 0:
            self._replaying = False
            mask = kwargs.get("attention_mask")
            emb: Any = kwargs.get("position_embeddings")  # transformers' (cos, sin), or None
            key = self._key(hidden, mask, kwargs, emb)
            if key is None:
                return eager(hidden, *args, **kwargs)
            if self.graphed is not None and key != self.key:
                self.drop("batches of different shapes")
                return eager(hidden, *args, **kwargs)
            if self.graphed is not None and self.pending.waiting():
                # a replay would overwrite the activations the pending backward still needs
                self.eager_because = "a forward before the previous forward's backward"
                return eager(hidden, *args, **kwargs)
            if self.graphed is None:
                seen_twice = key == self.last_key
                self.last_key = key
                if not seen_twice:
                    return eager(hidden, *args, **kwargs)
                self._capture(hidden, *emb)
                if self.graphed is None:
                    return eager(hidden, *args, **kwargs)
                self.key = key
            self._replaying = True
            self.replays += 1
        if not self._replaying or global_hooks():
            return eager(hidden, *args, **kwargs)
        cos, sin = kwargs["position_embeddings"]
        assert self.graphed is not None  # replaying: layer 0's call captured or kept the graphs
        out = self.graphed[index](hidden, cos, sin, *self.calls[index].params)
        if index == 0:
            self.pending.watch(out)
        return out


def _graphed_layer_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    graphs: DecoderGraphs = self.__dict__[_GRAPHS]
    return graphs.layer_forward(self.__dict__["_qlora_layer_index"], self, hidden_states, *args, **kwargs)


def text_decoder_layers(model: nn.Module) -> list[nn.Module] | None:
    """The layers of ``model.model.layers`` (Llama family), or None.

    Not ``recompute.decoder_layers``: that one returns every checkpointable block,
    vision towers included, and the graphs need exactly the text decoder's loop.
    """
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) and len(layers) else None


def enable_decoder_graphs(model: nn.Module, adapter_copies: Any = None) -> DecoderGraphs | None:
    """Route the decoder layers of ``model`` (a causal LM) through :class:`DecoderGraphs`.

    Returns the controller, or None when the model is not a supported decoder (Llama
    family with SDPA attention) or is not on CUDA.
    """
    layers = text_decoder_layers(model)
    config = getattr(model, "config", None)
    if layers is None or getattr(config, "_attn_implementation", None) not in SDPA_IMPLEMENTATIONS:
        return None
    if not allowed("transformers-decoder-layer-call"):
        return None
    if not next(layers[0].parameters()).is_cuda or any(hasattr(layer, _EAGER_FORWARD) for layer in layers):
        return None
    graphs = DecoderGraphs(layers, adapter_copies, model)
    for i, layer in enumerate(layers):
        setattr(layer, _EAGER_FORWARD, layer.forward)
        layer.__dict__[_GRAPHS] = graphs
        layer.__dict__["_qlora_layer_index"] = i
        layer.forward = types.MethodType(_graphed_layer_forward, layer)
    return graphs
