"""Mixture-of-experts experts stored in 4 bits, with LoRA on them.

:class:`QuantizedExperts` takes the place of a transformers fused-experts module
(``Qwen3MoeExperts``, ``MixtralExperts``, ``GptOssExperts``, ...; see
:mod:`qlora_plugin.core.experts`).

- **Storage.** Each expert's matrix is quantized on its own by bitsandbytes
  (``quantize_4bit``: the recipe's NF4/FP4, blocksize 64, double-quantized block constants),
  and the packed codes of all experts of a projection are stacked in one ``uint8``
  tensor, their constants beside them. Matrices are kept as ``(out, in)``, also where
  transformers stores them transposed (gpt-oss).
- **Forward.** Tokens are sorted by the expert they are routed to. For a batch of training
  size (at least as many routed tokens as experts) each projection dequantizes runs of
  consecutive routed experts in one launch each (at most 256 MiB of them at once) and
  multiplies all their tokens in one grouped GEMM (:mod:`qlora_plugin.build.expert_matmul`);
  backward dequantizes again, so no 16-bit expert weight is kept. For a few tokens
  (generation) each routed expert runs through bitsandbytes' 4-bit matmul on its own.
  Experts no token chose are never dequantized. Routers are not part of this module and
  stay as they are.
- **LoRA.** PEFT's ``ParamWrapper`` (``target_parameters``) builds the adapters, so their
  shapes, names and saved files are PEFT's own. Its forward would add a dense delta to all
  experts' weights; over a :class:`QuantizedExperts` the plugin's forward
  (:func:`install_wrapper_forward`, through the patch registry) instead adds each expert's
  low-rank update to that expert's tokens only (two grouped GEMMs in the compute dtype on
  the grouped path; the adapters' master weights keep their dtype and get their gradients in it).

The module exposes each projection to PEFT as a placeholder parameter of the original
shape (a ``uint8`` tensor with zero strides: one byte of memory), so PEFT finds, sizes
and names the targets exactly as on the 16-bit model.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch
from peft.tuners.lora.layer import ParamWrapper
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from qlora_plugin.build.context import RunContext, make_context
from qlora_plugin.build.expert_matmul import FrozenExpertsProduct, GroupedProduct, RoutedRows, plan_runs
from qlora_plugin.build.quantization import storage_dtype
from qlora_plugin.build.seeding import seeded_layer_init
from qlora_plugin.core import patches
from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.experts import EXPERT_PARAMS
from qlora_plugin.core.quantization_config import BLOCKSIZE
from qlora_plugin.core.run_record import note_built_layer

if TYPE_CHECKING:
    from collections.abc import Callable

    from qlora_plugin.core.recipe import QLoRARecipe

_log = logging.getLogger("qlora_plugin")
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes double-quantized constants in blocks of 256
GATE_ATTRS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")
# What the experts' forward reads back from the transformers class beside its weights.
FUSED_EXPERTS_PATCH = "transformers-fused-experts"
WRAPPER_PATCH = "peft-param-wrapper-forward"
# One LoRA adapter on one projection: A (experts * r, in), B (out, r * experts), scaling, as PEFT lays them out.
Adapter = tuple[torch.Tensor, torch.Tensor, float]


def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers fused-experts module (3-D expert weights, ``use_experts_implementation``'s layout)."""
    has_weights = any(_weight(module, name) is not None for name in EXPERT_PARAMS)
    return has_weights and all(hasattr(module, attr) for attr in GATE_ATTRS)


def is_quantized_experts(module: Any) -> bool:
    """True for the plugin's 4-bit experts."""
    return isinstance(module, QuantizedExperts)


def _bits_as_int32(values: torch.Tensor) -> torch.Tensor:
    """Float32 constants kept as int32 bits: model-wide ``.to(dtype)`` and fp32 upcasts leave them alone."""
    return values.to(torch.float32).contiguous().view(torch.int32)


class ExpertsPlaceholder(nn.Parameter):
    """The shape of a fused expert parameter with one byte of storage: what PEFT reads to size its adapters."""

    @classmethod
    def of_shape(cls, shape: tuple[int, ...], device: torch.device) -> ExpertsPlaceholder:
        return cls(torch.zeros((), dtype=torch.uint8, device=device).expand(shape), requires_grad=False)

    def __deepcopy__(self, memo: dict[int, Any]) -> ExpertsPlaceholder:  # a copy would be full size
        return type(self).of_shape(tuple(self.shape), self.device)


class QuantizedExperts(nn.Module):
    """The experts of one MoE layer in 4 bits (see the module docstring)."""

    qlora_quantized_experts = True  # read by qlora_plugin.core.experts (QUANTIZED_MARK)
    # "auto": grouped GEMMs when at least as many tokens are routed as there are experts, else one
    # bitsandbytes matmul per routed expert; "grouped" or "per_expert" force one way (tests, benchmarks).
    routing_strategy = "auto"

    def __init__(
        self,
        source: nn.Module,
        *,
        quant_type: str,
        double_quant: bool,
        compute_dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        """Quantize ``source``'s expert weights expert by expert; each 16-bit parameter is released once stored."""
        super().__init__()
        import bitsandbytes.functional as bnbf

        names = [name for name in EXPERT_PARAMS if _weight(source, name) is not None]
        first = _weight(source, names[0])
        assert first is not None
        self.device_for_codes = torch.device(device) if device is not None else first.device
        self.quant_type = quant_type
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self.num_experts = int(first.shape[0])
        for attr in GATE_ATTRS:
            setattr(self, attr, bool(getattr(source, attr)))
        for key, value in vars(source).items():  # plain settings the gate reads (gpt-oss: alpha, limit)
            if not key.startswith("_") and key not in ("training", *GATE_ATTRS) and not isinstance(value, torch.Tensor):
                setattr(self, key, value)
        if "act_fn" in source._modules:
            self.act_fn = source._modules["act_fn"]
        self._gate_function: Callable[..., torch.Tensor] | None = getattr(type(source), "_apply_gate", None)
        self.expert_shapes: dict[str, tuple[int, int, int]] = {}
        code = None
        for name in names:
            weight = _weight(source, name)
            assert weight is not None
            code = self._store(name, weight, bnbf)
            source._parameters[name] = nn.Parameter(weight.new_empty(0), requires_grad=False)  # release it
        assert code is not None
        self.register_buffer("code", _bits_as_int32(code[0]))
        if code[1] is not None:
            self.register_buffer("nested_code", _bits_as_int32(code[1]))
        for name in ("gate_up_proj_bias", "up_proj_bias", "down_proj_bias"):
            bias = source._parameters.get(name)
            if bias is not None:
                self.register_parameter(
                    name, nn.Parameter(bias.detach().to(self.device_for_codes, compute_dtype), requires_grad=False)
                )
        self._add_placeholders()

    # -- storage -----------------------------------------------------------------

    def _store(self, name: str, weight: torch.Tensor, bnbf: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Quantize each expert of ``weight`` into the stacked buffers of projection ``name``."""
        experts = int(weight.shape[0])
        self.expert_shapes[name] = (experts, int(weight.shape[1]), int(weight.shape[2]))
        out_features, in_features = self.matrix_shape(name)
        numel = out_features * in_features
        if numel % 2:
            raise ValueError(f"{name}: an expert's matrix has an odd number of weights ({numel}); 4-bit packs pairs")
        blocks = math.ceil(numel / BLOCKSIZE)
        device = self.device_for_codes
        codes = torch.empty(experts, numel // 2, dtype=torch.uint8, device=device)
        absmax = torch.empty(experts, blocks, dtype=torch.uint8 if self.double_quant else torch.float32, device=device)
        nested = torch.empty(experts, math.ceil(blocks / NESTED_BLOCKSIZE), dtype=torch.float32, device=device)
        offset = torch.empty(experts, dtype=torch.float32, device=device)
        code: tuple[torch.Tensor, torch.Tensor | None] | None = None
        with torch.no_grad():
            for expert in range(experts):
                matrix = weight[expert].to(device)
                if self.is_transposed:
                    matrix = matrix.t()
                packed, state = bnbf.quantize_4bit(
                    matrix.contiguous(),
                    blocksize=BLOCKSIZE,
                    compress_statistics=self.double_quant,
                    quant_type=self.quant_type,
                    quant_storage=torch.uint8,
                )
                codes[expert] = packed.view(-1)
                absmax[expert] = state.absmax
                if self.double_quant:
                    nested[expert] = state.state2.absmax
                    offset[expert] = state.offset
                if code is None:
                    code = (state.code, state.state2.code if self.double_quant else None)
        self.register_buffer(f"{name}_codes", codes)
        self.register_buffer(f"{name}_absmax", absmax if self.double_quant else _bits_as_int32(absmax))
        if self.double_quant:
            self.register_buffer(f"{name}_nested_absmax", _bits_as_int32(nested))
            self.register_buffer(f"{name}_offset", _bits_as_int32(offset))
        assert code is not None
        return code

    def stored(self, key: str) -> torch.Tensor:
        """The stored buffer ``key`` (codes, constants)."""
        tensor = self._buffers[key]
        assert tensor is not None
        return tensor

    def _add_placeholders(self) -> None:
        """One placeholder parameter per projection, of the shape transformers gives it (one byte of storage)."""
        device = self.stored("code").device
        for name, shape in self.expert_shapes.items():
            self._parameters[name] = ExpertsPlaceholder.of_shape(shape, device)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedExperts:
        """Move the stored codes, never the placeholders (a copy would make them full size)."""
        for name in self.expert_shapes:
            self._parameters.pop(name, None)
        try:
            super()._apply(fn, recurse)
        finally:
            self._add_placeholders()
        return self

    def matrix_shape(self, name: str) -> tuple[int, int]:
        """Each expert's stored matrix of projection ``name``: (out_features, in_features)."""
        _, first, second = self.expert_shapes[name]
        return (second, first) if self.is_transposed else (first, second)

    def quant_state(self, name: str, expert: int) -> Any:
        """bitsandbytes' ``QuantState`` of one expert of projection ``name`` (views of the stored constants)."""
        from bitsandbytes.functional import QuantState

        nested = None
        offset = None
        absmax = self.stored(f"{name}_absmax")[expert]
        if self.double_quant:
            nested = QuantState(
                absmax=self.stored(f"{name}_nested_absmax")[expert].view(torch.float32),
                code=self.stored("nested_code").view(torch.float32),
                blocksize=NESTED_BLOCKSIZE,
                dtype=torch.float32,
            )
            offset = self.stored(f"{name}_offset")[expert].view(torch.float32)
        else:
            absmax = absmax.view(torch.float32)
        return QuantState(
            absmax=absmax,
            shape=torch.Size(self.matrix_shape(name)),
            code=self.stored("code").view(torch.float32),
            blocksize=BLOCKSIZE,
            quant_type=self.quant_type,
            dtype=self.compute_dtype,
            offset=offset,
            state2=nested,
        )

    def codes(self, name: str, expert: int) -> torch.Tensor:
        """The packed codes of one expert, shaped as bitsandbytes stores a 4-bit weight."""
        return self.stored(f"{name}_codes")[expert].view(-1, 1)

    def dequantized(self, name: str, expert: int) -> torch.Tensor:
        """One expert's matrix of projection ``name`` as (out_features, in_features), in the compute dtype."""
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(self.codes(name, expert), self.quant_state(name, expert))

    def dequantized_experts(self, name: str, first: int, stop: int) -> torch.Tensor:
        """Experts ``first`` .. ``stop - 1`` of projection ``name`` as (experts, out, in) in the compute dtype.

        One bitsandbytes launch for all of them where each row fills whole blocks (the stacked codes
        then read as one buffer); else expert by expert. The same values as :meth:`dequantized`.
        (bitsandbytes 0.50's CPU kernel lays out blocks by row when a row is shorter than a block.)
        """
        from bitsandbytes.functional import QuantState, dequantize_4bit

        out_features, in_features = self.matrix_shape(name)
        if in_features % BLOCKSIZE:
            return torch.stack([self.dequantized(name, expert) for expert in range(first, stop)])
        absmax = self.stored(f"{name}_absmax")[first:stop]
        if self.double_quant:  # bitsandbytes' own arithmetic: nested code * nested absmax, then + offset
            nested = self.stored(f"{name}_nested_absmax")[first:stop].view(torch.float32)
            offset = self.stored(f"{name}_offset")[first:stop].view(torch.float32)
            block = torch.arange(absmax.shape[1], device=absmax.device) // NESTED_BLOCKSIZE
            scales = self.stored("nested_code").view(torch.float32)[absmax.long()] * nested[:, block]
            scales = scales + offset[:, None]
        else:
            scales = absmax.view(torch.float32)
        state = QuantState(
            absmax=scales.reshape(-1),
            shape=torch.Size(((stop - first) * out_features, in_features)),
            code=self.stored("code").view(torch.float32),
            blocksize=BLOCKSIZE,
            quant_type=self.quant_type,
            dtype=self.compute_dtype,
        )
        codes = self.stored(f"{name}_codes")[first:stop].reshape(-1, 1)
        return dequantize_4bit(codes, state).view(stop - first, out_features, in_features)

    def dequantized_param(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Projection ``name`` as transformers stores it, dequantized (every expert: for merging, not training)."""
        result = torch.empty(
            self.expert_shapes[name], dtype=dtype or self.compute_dtype, device=self.stored("code").device
        )
        for expert in range(self.num_experts):
            matrix = self.dequantized(name, expert)
            result[expert] = matrix.t() if self.is_transposed else matrix
        return result

    # -- forward -----------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        adapters: dict[str, list[Adapter]] | None = None,
    ) -> torch.Tensor:
        """The experts' output for ``hidden_states`` (tokens, hidden) routed by ``top_k_index`` / ``top_k_weights``.

        ``adapters``: per projection, the LoRA adapters to add (PEFT's layout, see :data:`Adapter`).
        """
        adapters = adapters or {}
        strategy = self.routing_strategy
        if strategy == "grouped" or (strategy == "auto" and top_k_index.numel() >= self.num_experts):
            return self._grouped_forward(hidden_states, top_k_index, top_k_weights, adapters)
        return self._per_expert_forward(hidden_states, top_k_index, top_k_weights, adapters)

    def _sorted_routing(self, top_k_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, RoutedRows]:
        """The routed (token, slot) pairs sorted by expert: their flat slot indices, their tokens, and the counts.

        Both forwards walk the pairs in this order; a stable sort keeps each expert's tokens in order.
        """
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tokens = torch.div(order, top_k_index.shape[-1], rounding_mode="floor")
        return order, tokens, RoutedRows.of_experts(flat, self.num_experts)

    def _first_projection(self) -> str:
        return "gate_up_proj" if "gate_up_proj" in self.expert_shapes else "up_proj"

    def _grouped_forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        adapters: dict[str, list[Adapter]],
    ) -> torch.Tensor:
        """All routed tokens sorted by expert; each projection a few grouped GEMMs (see the module docstring)."""
        order, tokens, rows = self._sorted_routing(top_k_index)
        experts_of_rows = top_k_index.reshape(-1)[order]
        # index_select, not indexing: its backward is one index_add, where indexing's sorts the indices first
        x = hidden_states.to(self.compute_dtype).index_select(0, tokens)
        h = self._grouped_project(self._first_projection(), x, rows, experts_of_rows, adapters)
        y = self._grouped_project("down_proj", self._gate(h), rows, experts_of_rows, adapters)
        y = y * top_k_weights.reshape(-1)[order].to(y.dtype)[:, None]
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        per_slot = y.index_select(0, back).view(*top_k_index.shape, y.shape[-1])  # (tokens, top_k, hidden), unsorted
        return per_slot.sum(dim=1, dtype=torch.float32).to(hidden_states.dtype)

    def _grouped_project(
        self,
        name: str,
        x: torch.Tensor,
        rows: RoutedRows,
        experts_of_rows: torch.Tensor,
        adapters: dict[str, list[Adapter]],
    ) -> torch.Tensor:
        out_features, in_features = self.matrix_shape(name)
        expert_bytes = out_features * in_features * torch.finfo(self.compute_dtype).bits // 8
        runs = plan_runs(rows, expert_bytes)

        def dequantize(first: int, stop: int) -> torch.Tensor:
            return self.dequantized_experts(name, first, stop)

        y = FrozenExpertsProduct.apply(x, rows, runs, dequantize, (out_features, in_features))
        bias = self._parameters.get(f"{name}_bias")
        if bias is not None:
            y = y + bias[experts_of_rows]
        for lora_a, lora_b, scale in adapters.get(name, ()):
            a = lora_a.to(x.dtype).view(self.num_experts, -1, in_features).transpose(1, 2)  # (experts, in, r)
            b = lora_b.to(x.dtype).view(out_features, -1, self.num_experts).permute(2, 1, 0).contiguous()
            y = y + GroupedProduct.apply(GroupedProduct.apply(x, a, rows), b, rows) * scale
        return y

    def _per_expert_forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        adapters: dict[str, list[Adapter]],
    ) -> torch.Tensor:
        """Each routed expert on its own tokens through bitsandbytes' 4-bit matmul (few tokens: generation)."""
        import bitsandbytes as bnb

        order, tokens_of_rows, rows = self._sorted_routing(top_k_index)
        per_expert = {
            name: [_split(a, b, self.num_experts) + (scale,) for a, b, scale in found]
            for name, found in adapters.items()
        }
        result = torch.zeros_like(hidden_states, dtype=self.compute_dtype)
        inputs = hidden_states.to(self.compute_dtype)
        first = self._first_projection()
        start = 0
        for expert, count in enumerate(rows.counts):
            if count == 0:
                continue
            chosen = order[start : start + count]
            tokens = tokens_of_rows[start : start + count]
            start += count
            x = inputs[tokens]
            h = self._project(bnb, first, expert, x, per_expert)
            h = self._gate(h)
            y = self._project(bnb, "down_proj", expert, h, per_expert)
            weights = top_k_weights.reshape(-1)[chosen].to(y.dtype)
            result.index_add_(0, tokens, y * weights[:, None])
        return result.to(hidden_states.dtype)

    def _project(
        self, bnb: Any, name: str, expert: int, x: torch.Tensor, adapters: dict[str, list[Any]]
    ) -> torch.Tensor:
        y = bnb.matmul_4bit(x, self.codes(name, expert).t(), quant_state=self.quant_state(name, expert))
        bias = self._parameters.get(f"{name}_bias")
        if bias is not None:
            y = y + bias[expert]
        for lora_a, lora_b, scale in adapters.get(name, ()):
            a, b = lora_a[expert], lora_b[expert]
            y = y + ((x.to(a.dtype) @ a.t()) @ b.t() * scale).to(y.dtype)
        return y

    def _gate(self, h: torch.Tensor) -> torch.Tensor:
        """The experts' activation between the two projections: transformers' own ``_apply_gate`` where gated."""
        if self.has_gate and self._gate_function is not None:
            return self._gate_function(self, h)
        activation = self._modules.get("act_fn")
        assert activation is not None
        if not self.has_gate:
            return activation(h)
        gate, up = h.chunk(2, dim=-1)
        return activation(gate) * up

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{name}={tuple(shape)}" for name, shape in self.expert_shapes.items())
        quant = f"{self.quant_type}{' + double quant' if self.double_quant else ''}"
        return f"{self.num_experts} experts in 4 bits ({quant}, blocksize {BLOCKSIZE}): {shapes}"


def _weight(module: nn.Module, name: str) -> torch.Tensor | None:
    """The 16/32-bit 3-D expert weight ``name`` of ``module`` (not the 4-bit experts' placeholders), or None."""
    param = module._parameters.get(name)
    return param if param is not None and param.dim() == 3 and param.is_floating_point() else None


def _split(lora_a: torch.Tensor, lora_b: torch.Tensor, experts: int) -> tuple[tuple[torch.Tensor, ...], ...]:
    """PEFT's stacked adapter weights as one (A, B) per expert (``unbind``: one gradient for all experts)."""
    a = lora_a.view(experts, -1, lora_a.shape[-1]).unbind(0)  # each (r, in)
    b = lora_b.view(lora_b.shape[0], -1, experts).unbind(2)  # each (out, r)
    return a, b


# -- putting experts in 4 bits ------------------------------------------------------


def may_quantize_experts() -> bool:
    """Whether this transformers and PEFT are ones the 4-bit experts were tested with (one warning if not)."""
    return patches.allowed(FUSED_EXPERTS_PATCH) and patches.allowed(WRAPPER_PATCH)


def quantize_module(
    module: nn.Module,
    recipe: QLoRARecipe,
    device: torch.device | str | None = None,
    context: RunContext | None = None,
) -> QuantizedExperts:
    """A :class:`QuantizedExperts` holding ``module``'s experts in the recipe's 4-bit format.

    ``context``: the run (default: one from the launch), whose sharding decides the storage.
    """
    weight = next(p for p in module.parameters() if p.dim() == 3)
    target = torch.device(device) if device is not None else weight.device
    compute_dtype = recipe.resolved_compute_dtype(target.type)
    if storage_dtype(recipe, compute_dtype, context or make_context(recipe)) != torch.uint8:
        raise QLoRAConfigError(
            "quant_storage",
            recipe.quant_storage,
            "mixture-of-experts experts are stored in 4 bits as uint8 only (FSDP and DeepSpeed ZeRO-3 shard "
            "float-stored weights; sharded 4-bit experts are not supported)",
            "train the MoE model on one GPU or with DDP, and leave quant_storage='auto'",
        )
    install_wrapper_forward()
    return QuantizedExperts(
        module,
        quant_type=recipe.quant_type,
        double_quant=recipe.double_quant,
        compute_dtype=compute_dtype,
        device=target,
    )


def quantize_experts(
    model: nn.Module,
    recipe: QLoRARecipe,
    device: torch.device | str | None = None,
    context: RunContext | None = None,
) -> int:
    """Store every fused experts module of ``model`` in 4 bits, one module (and expert) at a time.

    Returns how many modules were quantized (0 outside the tested versions, after one warning).
    ``context``: the run the model trains in (default: one from the launch).
    """
    candidates = [(name, module) for name, module in model.named_modules() if is_fused_experts(module)]
    if not candidates or not may_quantize_experts():
        return 0
    for name, module in candidates:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantize_module(module, recipe, device, context))
    _log.info("qlora: %d mixture-of-experts expert modules stored in 4 bits (%s)", len(candidates), recipe.quant_type)
    return len(candidates)


def roundtrip_experts(model: nn.Module, recipe: QLoRARecipe) -> int:
    """Replace each fused expert weight of a 16-bit ``model`` by its 4-bit round trip (what training saw).

    Used before merging an adapter: the experts are quantized as training stored them and
    dequantized back into the model's own parameters, one module at a time.
    """
    if not may_quantize_experts():
        return 0  # training left them in 16 bits too
    count = 0
    for _, module in list(model.named_modules()):
        if not is_fused_experts(module):
            continue
        names = [name for name in EXPERT_PARAMS if _weight(module, name) is not None]
        dtypes = {name: weight.dtype for name in names if (weight := _weight(module, name)) is not None}
        quantized = quantize_module(module, recipe)
        for name in names:
            module._parameters[name] = nn.Parameter(
                quantized.dequantized_param(name, dtypes[name]), requires_grad=False
            )
        count += 1
    return count


# -- PEFT's LoRA layers over 4-bit experts ------------------------------------------------


def make_expert_lora_layer(
    target: nn.Module, adapter_name: str, config: Any, context: RunContext | None = None, **kwargs: Any
) -> nn.Module | None:
    """The recipe's factory for PEFT's ``target_parameters``: a ``ParamWrapper`` over 4-bit experts.

    A 16-bit fused experts module (a model loaded by someone else) is quantized here first, and
    PEFT puts the wrapper where the 16-bit module was. Anything else: ``None`` (PEFT decides).
    ``context``: the run the layer belongs to (its seed, its messages; default: one from the launch).
    """
    parameter_name = kwargs.get("parameter_name")
    if parameter_name is None:
        return None
    context = context or make_context(config)
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not is_quantized_experts(base):
        if parameter_name not in EXPERT_PARAMS or not is_fused_experts(base) or not may_quantize_experts():
            return None
        target = quantize_module(base, config, context=context)
        context.say_once(
            logging.WARNING,
            "the mixture-of-experts experts were not stored in 4 bits: they are quantized now, layer by layer "
            f"({config.quant_type}, double quant {config.double_quant}). Loading with recipe.load_model(...) "
            "stores them in 4 bits before training.",
        )
    with seeded_layer_init(context.seed, kwargs.get("target_name")):
        wrapper = ParamWrapper(target, adapter_name, config=config, **kwargs)
    note_built_layer(wrapper, config, kwargs.get("target_name"))  # qlora_recipe.json records its target_parameters
    return wrapper


def wrapped_experts(wrapper: Any) -> tuple[Any, dict[str, list[Adapter]]]:
    """The innermost module under nested ``ParamWrapper`` layers, and the active adapters of each projection."""
    adapters: dict[str, list[Adapter]] = {}
    layer = wrapper
    while isinstance(layer, ParamWrapper):
        if not layer.disable_adapters and not layer.merged:
            for name in layer.active_adapters:
                if name in layer.lora_A:
                    lora_a: torch.Tensor = layer.lora_A[name].weight  # type: ignore[assignment]
                    lora_b: torch.Tensor = layer.lora_B[name].weight  # type: ignore[assignment]
                    adapters.setdefault(layer.parameter_name, []).append((lora_a, lora_b, layer.scaling[name]))
        layer = layer.base_layer
    return layer, adapters


def install_wrapper_forward() -> bool:
    """Route PEFT's ``ParamWrapper.forward`` over 4-bit experts to the experts' routed forward (once per process).

    Other wrappers keep PEFT's forward. ``merge`` into 4-bit experts is refused (``qlora merge``
    merges into the dequantized model). Made and undone by the patch registry
    (:mod:`qlora_plugin.core.patches`); False outside the tested PEFT versions.
    """
    return patches.apply(WRAPPER_PATCH, _routing_wrapper)


def uninstall_wrapper_forward() -> None:
    """Give PEFT's ``ParamWrapper`` its own ``forward`` and ``merge`` back."""
    patches.revert(WRAPPER_PATCH)


def _routing_wrapper(originals: dict[str, Any]) -> dict[str, Any]:
    """``ParamWrapper``'s ``forward`` and ``merge`` for 4-bit experts, PEFT's own for every other wrapper."""
    original_forward, original_merge = originals["forward"], originals["merge"]

    def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        experts, adapters = wrapped_experts(self)
        if not is_quantized_experts(experts):
            return original_forward(self, x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("LoRA on 4-bit experts does not support mixed adapter batches")
        return experts(x, *args, adapters=adapters, **kwargs)

    def merge(self: Any, *args: Any, **kwargs: Any) -> None:
        experts, _ = wrapped_experts(self)
        if is_quantized_experts(experts):
            raise QLoRAConfigError(
                "merge",
                "4-bit experts",
                "an adapter cannot be merged into experts stored in 4 bits",
                "save the adapter and run `qlora merge ADAPTER_DIR --out DIR` (it merges into the dequantized base)",
            )
        original_merge(self, *args, **kwargs)

    return {"forward": forward, "merge": merge}
