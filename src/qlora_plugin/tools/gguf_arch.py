"""How each supported model family is laid out in GGUF, as llama.cpp reads it.

A family maps to one llama.cpp architecture: its hyper-parameter keys, its tensor names
(from the ``gguf`` package's own name map) and the changes its weights need on the way:

- llama.cpp's ``llama`` graph (Llama and Mistral) applies RoPE to interleaved pairs where
  transformers rotates halves, so the rows of ``q_proj`` and ``k_proj`` are permuted per head;
  Qwen and Gemma use the half-split ("NeoX") layout in both and are written as they are.
- Gemma's RMSNorm computes ``x * (1 + w)``; llama.cpp computes ``x * w``, so every norm weight
  is written plus one. Gemma's embedding scale (``sqrt(hidden_size)``) is built into llama.cpp's
  Gemma graphs and needs nothing.
- Qwen3 and Gemma 3 have RMSNorms on the queries and keys (``attn_q_norm``/``attn_k_norm``).
- A tied output head is not written: llama.cpp reads the embedding in its place.
- Mixture-of-experts families (Qwen2-MoE, Qwen3-MoE, Mixtral under llama.cpp's ``llama``) keep
  each layer's experts in 3-D tensors, (experts, rows, columns) in numpy's order as in
  transformers 5's fused experts: ``gate_up_proj`` (experts, 2 x width, hidden), gate rows
  first, is split into ``ffn_gate_exps`` and ``ffn_up_exps``; ``down_proj`` is ``ffn_down_exps``
  as it is. llama.cpp's graphs hard-code how the router's top-k weights are normalised, and
  put experts in every layer: a config that routes otherwise is refused.

What llama.cpp hard-codes (Gemma 2's and 3's attention scale and sliding-window pattern, Gemma 3's
local RoPE base) is checked against the config: a model that differs is refused rather than
written into a file that would run, silently, as another model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qlora_plugin.core.errors import QLoRAConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from gguf import GGUFWriter


@dataclass(frozen=True)
class Family:
    """One model family: transformers' ``model_type`` and how llama.cpp names and reads it."""

    name: str
    arch: str  # llama.cpp's architecture name (general.architecture)
    permute_qk: bool = False
    norm_plus_one: bool = False
    swa_pattern: int = 0  # every n-th layer attends globally, the others in a sliding window (0: none)
    experts: bool = False  # a mixture of experts in every layer
    # whether llama.cpp's graph renormalises the top-k router weights to sum to 1 (``norm_w`` in its call to
    # build_moe_ffn: true in src/models/llama.cpp and qwen3moe.cpp, false in qwen2moe.cpp); None for Mixtral,
    # whose transformers router always renormalises and has no config field
    norm_topk: bool | None = None
    shared_expert: bool = False  # Qwen2-MoE's sigmoid-gated shared expert beside the routed ones


FAMILIES = {
    "llama": Family("Llama", "llama", permute_qk=True),
    "mistral": Family("Mistral", "llama", permute_qk=True),
    "qwen2": Family("Qwen2", "qwen2"),
    "qwen3": Family("Qwen3", "qwen3"),
    "gemma2": Family("Gemma 2", "gemma2", norm_plus_one=True, swa_pattern=2),
    "gemma3_text": Family("Gemma 3 (text)", "gemma3", norm_plus_one=True, swa_pattern=6),
    # llama.cpp's convert_hf_to_gguf.py writes Mixtral as ``llama`` with expert tensors (src/models/llama.cpp
    # builds the MoE branch where a layer has ffn_gate_inp), Qwen2-MoE as ``qwen2moe``, Qwen3-MoE as ``qwen3moe``
    "mixtral": Family("Mixtral", "llama", permute_qk=True, experts=True),
    "qwen2_moe": Family("Qwen2-MoE", "qwen2moe", experts=True, norm_topk=False, shared_expert=True),
    "qwen3_moe": Family("Qwen3-MoE", "qwen3moe", experts=True, norm_topk=True),
}
SUPPORTED = (
    "Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text models (Gemma3ForCausalLM), and the mixtures of experts "
    "Mixtral, Qwen2-MoE, Qwen3-MoE"
)
# llama.cpp picks Gemma's attention scale by layer count: 1/sqrt(hidden/heads) for the 27B shapes, else 1/sqrt(head_dim)
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}
GEMMA3_LOCAL_ROPE_BASE = 10000.0


@dataclass(frozen=True)
class Tensor:
    """One tensor to write: its GGUF name and shape, and how to make its float32 data."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]


def family_of(config: Any) -> Family:
    """The family of ``config``, or a one-line error that names the model and the supported list."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(str(model_type))
    if family is None:
        architectures = getattr(config, "architectures", None)
        raise QLoRAConfigError(
            "architecture",
            architectures[0] if architectures else model_type,
            "has no GGUF export here" + (f" (model_type {model_type!r})" if architectures else ""),
            f"export one of {SUPPORTED}, or convert the merged folder (qlora merge) with llama.cpp's "
            "convert_hf_to_gguf.py",
        )
    return family


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def expert_count(config: Any) -> int:
    """The number of routed experts (Mixtral's ``num_local_experts``, Qwen's ``num_experts``)."""
    return int(getattr(config, "num_local_experts", None) or config.num_experts)


def rope_settings(config: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The RoPE parameters of the global layers, and of the sliding-window layers where they differ."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "full_attention" in params:
        return dict(params["full_attention"]), dict(params.get("sliding_attention") or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params, None


def check_config(config: Any, family: Family) -> None:
    """Refuse what llama.cpp's graph for ``family`` cannot reproduce (named with the fix)."""
    model_type = config.model_type
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    expected_activation = ("gelu_pytorch_tanh", "gelu") if family.norm_plus_one else ("silu",)
    if activation not in expected_activation:
        _refuse("hidden_act", activation, f"llama.cpp's {family.arch} graph uses {expected_activation[0]}")
    factor = getattr(config, "partial_rotary_factor", None)
    if factor not in (None, 1, 1.0):
        _refuse("partial_rotary_factor", factor, f"llama.cpp's {family.arch} graph rotates whole heads")
    if getattr(config, "use_sliding_window", False) and family.swa_pattern == 0:
        _refuse("use_sliding_window", True, f"llama.cpp's {family.arch} graph attends to the whole context")
    global_rope, local_rope = rope_settings(config)
    rope_type = global_rope.get("rope_type", global_rope.get("type", "default"))
    allowed = {"default", "linear", "llama3"} if family.arch == "llama" else {"default", "linear"}
    if rope_type not in allowed:
        _refuse("rope_parameters.rope_type", rope_type, f"this export writes {sorted(allowed)} for {family.name}")
    if family.swa_pattern:
        pattern = [
            "full_attention" if (i + 1) % family.swa_pattern == 0 else "sliding_attention"
            for i in range(config.num_hidden_layers)
        ]
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and list(layer_types) != pattern:
            _refuse(
                "layer_types",
                "custom",
                f"llama.cpp's {family.arch} graph makes every {family.swa_pattern}. layer global, the others "
                "sliding-window",
            )
        heads = config.num_attention_heads
        scalar = (
            config.hidden_size // heads
            if config.num_hidden_layers == GEMMA_27B_LAYERS[model_type]
            else head_dim(config)
        )
        if getattr(config, "query_pre_attn_scalar", scalar) != scalar:
            _refuse(
                "query_pre_attn_scalar",
                config.query_pre_attn_scalar,
                f"llama.cpp scales the queries of a {config.num_hidden_layers}-layer {family.name} by 1/sqrt({scalar})",
            )
    if family.experts:
        _check_experts(config, family)
    if local_rope is not None and model_type == "gemma3_text":
        local_type = local_rope.get("rope_type", "default")
        if (
            local_type != "default"
            or float(local_rope.get("rope_theta", GEMMA3_LOCAL_ROPE_BASE)) != GEMMA3_LOCAL_ROPE_BASE
        ):
            _refuse(
                "rope_parameters.sliding_attention",
                local_rope,
                f"llama.cpp's gemma3 graph uses plain RoPE with base {GEMMA3_LOCAL_ROPE_BASE:g} in its local layers",
            )


def _check_experts(config: Any, family: Family) -> None:
    """What llama.cpp's MoE graphs hard-code: softmax routing over every expert, the top-k weights renormalised
    or not per architecture, experts in every layer (each layer's ffn_gate_inp and *_exps tensors are required).
    Mixtral's ``router_jitter_noise`` acts only in training, so it needs no check."""
    if family.norm_topk is not None and bool(getattr(config, "norm_topk_prob", False)) != family.norm_topk:
        _refuse(
            "norm_topk_prob",
            getattr(config, "norm_topk_prob", False),
            f"llama.cpp's {family.arch} graph {'always' if family.norm_topk else 'never'} renormalises the "
            "top-k router weights",
        )
    step = getattr(config, "decoder_sparse_step", 1)
    if step not in (None, 1):
        _refuse("decoder_sparse_step", step, f"llama.cpp's {family.arch} graph puts experts in every layer")
    dense = list(getattr(config, "mlp_only_layers", None) or [])
    if dense:
        _refuse("mlp_only_layers", dense, f"llama.cpp's {family.arch} graph puts experts in every layer")
    if family.shared_expert and head_dim(config) * config.num_attention_heads != config.hidden_size:
        _refuse(  # src/models/qwen2moe.cpp sizes attn_q and attn_output {n_embd, n_embd}
            "head_dim",
            head_dim(config),
            f"llama.cpp's {family.arch} graph needs num_attention_heads x head_dim = hidden_size",
        )
    top_k = config.num_experts_per_tok
    if not 0 < top_k <= expert_count(config):
        _refuse("num_experts_per_tok", top_k, f"llama.cpp routes each token to 1 to {expert_count(config)} experts")


def _refuse(field: str, value: Any, why: str) -> None:
    raise QLoRAConfigError(
        f"config.json {field}",
        value,
        f"cannot be written to GGUF: {why}",
        "export the merged model to another format (qlora merge), or change the runtime",
    )


def write_hparams(writer: GGUFWriter, config: Any, family: Family) -> None:
    """The hyper-parameters under the keys llama.cpp reads for ``family.arch``."""
    import gguf

    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    # Mixtral's intermediate_size is each expert's width, which llama.cpp's llama graph reads here
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    global_rope, _ = rope_settings(config)
    writer.add_rope_freq_base(float(global_rope.get("rope_theta", 10000.0)))
    if family.arch == "llama":
        writer.add_rope_dimension_count(head_dim(config))
    if global_rope.get("rope_type", global_rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(global_rope["factor"]))
    if family.experts:
        # the keys convert_hf_to_gguf.py writes and llama-model.cpp reads: {arch}.expert_count and
        # .expert_used_count for every MoE, .expert_feed_forward_length (n_ff_exp) and, for the shared expert,
        # .expert_shared_feed_forward_length (n_ff_shexp) in src/models/qwen2moe.cpp and qwen3moe.cpp
        writer.add_expert_count(expert_count(config))
        writer.add_expert_used_count(config.num_experts_per_tok)
        if getattr(config, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        if family.shared_expert:
            writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    if family.swa_pattern:
        writer.add_sliding_window(config.sliding_window)
        if getattr(config, "attn_logit_softcapping", None):
            writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(config.final_logit_softcapping)


def plan_tensors(model: torch.nn.Module, config: Any, family: Family) -> list[Tensor]:
    """Every tensor of ``model`` under its GGUF name, with the changes ``family`` needs; unknown names are refused."""
    import gguf

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == family.arch)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    planned = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reads the embedding where the output tensor is missing
        if family.experts and hf_name.endswith(".experts.gate_up_proj"):
            planned.extend(_split_gate_up(hf_name, tensor, names))
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is not None and not name.endswith((".weight", ".bias")):
            name += ".weight"  # a fused experts parameter (down_proj) has no suffix in transformers
        if name is None:
            raise QLoRAConfigError(
                "tensor",
                hf_name,
                f"has no place in llama.cpp's {family.arch} architecture",
                f"export a standard {family.name} model (this one has extra weights llama.cpp would not read)",
            )
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None
        if family.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            transform = _permuter(heads)
        elif family.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            transform = _permuter(kv_heads)
        elif family.norm_plus_one and hf_name.endswith("norm.weight"):
            transform = _plus_one
        shape = tuple(tensor.shape)
        if family.shared_expert and hf_name.endswith("shared_expert_gate.weight"):
            shape = shape[1:]  # (1, hidden): llama.cpp's ffn_gate_inp_shexp is a vector {n_embd}
            transform = _flatten
        planned.append(Tensor(name, shape, _maker(tensor, transform)))
    rope_freqs = llama3_rope_factors(config, family)
    if rope_freqs is not None:
        planned.append(Tensor("rope_freqs.weight", tuple(rope_freqs.shape), _maker(rope_freqs, None)))
    return planned


def _split_gate_up(hf_name: str, tensor: torch.Tensor, names: Any) -> list[Tensor]:
    """transformers' fused (experts, 2 x width, hidden) ``gate_up_proj`` as llama.cpp's ``ffn_gate_exps`` and
    ``ffn_up_exps``, each (experts, width, hidden): the experts' forward computes ``linear(x, gate_up).chunk(2)``,
    gate first. The ``gguf`` name map names the halves as ``experts.gate_proj`` and ``experts.up_proj``."""
    prefix = hf_name.removesuffix("gate_up_proj")
    width = tensor.shape[1] // 2
    halves = []
    for part, rows in (("gate_proj", slice(0, width)), ("up_proj", slice(width, None))):
        name = names.get_name(prefix + part)
        if name is None:  # the gguf package names the experts of every family here; an old one may not
            raise QLoRAConfigError(
                "tensor", hf_name, "has no expert tensor name in the installed gguf package", "upgrade gguf"
            )
        shape = (tensor.shape[0], width, tensor.shape[2])
        halves.append(Tensor(f"{name}.weight", shape, _maker(tensor, _rows(rows))))
    return halves


def _rows(rows: slice) -> Callable[[torch.Tensor], torch.Tensor]:
    def take(weight: torch.Tensor) -> torch.Tensor:
        return weight[:, rows, :]

    return take


def _flatten(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(-1)


def _maker(tensor: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[[], np.ndarray]:
    def make() -> np.ndarray:
        import torch

        data = tensor.detach().to("cpu", torch.float32)
        if transform is not None:
            data = transform(data)
        return data.contiguous().numpy()

    return make


def _permuter(n_head: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Rows of each head from halves (transformers' rotate_half) to interleaved pairs (llama.cpp's ``llama``)."""

    def permute(weight: torch.Tensor) -> torch.Tensor:
        shape = weight.shape
        return weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)

    return permute


def _plus_one(weight: torch.Tensor) -> torch.Tensor:
    return weight + 1.0


def llama3_rope_factors(config: Any, family: Family) -> torch.Tensor | None:
    """Llama 3.1's RoPE scaling as llama.cpp's ``rope_freqs`` tensor: each frequency's divisor, or None."""
    global_rope, _ = rope_settings(config)
    if family.arch != "llama" or global_rope.get("rope_type", global_rope.get("type")) != "llama3":
        return None
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim = head_dim(config)
    theta = float(global_rope.get("rope_theta", 10000.0))
    plain = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (plain / scaled.to(torch.float64)).to(torch.float32)


def tensor_types(planned: list[Tensor], out_type: str) -> Iterator[tuple[Tensor, Any]]:
    """Each tensor with the GGML type it is written in: norms, biases, RoPE factors and the routers stay float32;
    the embedding and output head of a q4_0 file are q8_0; rows that do not fill whole blocks fall back to f16."""
    import gguf

    q = gguf.GGMLQuantizationType
    wanted = {"f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0, "q4_0": q.Q4_0}[out_type]
    for tensor in planned:
        kind = wanted
        # convert_hf_to_gguf.py keeps the routers (ffn_gate_inp, ffn_gate_inp_shexp) in float32 too
        if len(tensor.shape) < 2 or tensor.name == "rope_freqs.weight" or ".ffn_gate_inp" in tensor.name:
            kind = q.F32
        elif kind == q.Q4_0 and tensor.name.split(".")[0] in ("token_embd", "output"):
            kind = q.Q8_0
        if kind in (q.Q8_0, q.Q4_0) and tensor.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0] != 0:
            kind = q.F16
        yield tensor, kind


FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


def file_type(out_type: str) -> int:
    import gguf

    return int(getattr(gguf.LlamaFileType, FILE_TYPES[out_type]))
