"""A random-init Llama built straight into 4 bits, one decoder layer at a time (issue 17's 70B shape).

The model is created on the ``meta`` device; each decoder layer is then given memory on
``device``, filled with seeded random weights in the compute dtype, and its linear layers are
quantized by the recipe's own ``quantize_linear`` before the next layer exists. The 16-bit
model is never whole on the device or in a file: the peak is the 4-bit model plus one 16-bit
layer. Every rank that builds with the same seed gets the same weights, so each can build its
own copy and hand it to FSDP, which shards it.

    model = build_quantized(llama_config, recipe, device="cuda:0")
"""

from __future__ import annotations

from typing import Any

INIT_STD = 0.02


def init_layer_(module: Any, seed: int) -> None:
    """Seeded weights for a freshly materialised ``module``: normal(0, 0.02) matrices and embeddings, unit norms."""
    import torch

    device = next(module.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)  # drawn where the weights live: fast on a GPU
    with torch.no_grad():
        for _, owner in sorted(module.named_modules(), key=lambda item: item[0]):
            for name, parameter in sorted(owner.named_parameters(recurse=False)):
                if parameter.dim() == 1:  # a norm's scale is one, a bias zero
                    parameter.fill_(1.0 if "Norm" in type(owner).__name__ and name == "weight" else 0.0)
                    continue
                parameter.normal_(0.0, INIT_STD, generator=generator)


def build_quantized(config: Any, recipe: Any, device: str, seed: int = 1234, quantize: bool = True) -> Any:
    """A ``LlamaForCausalLM`` of ``config`` on ``device`` whose decoder linears are 4-bit, built layer by layer.

    ``quantize=False`` builds the same weights in the compute dtype (the tests compare the two).
    Embeddings, norms and the head stay in the compute dtype, as 4-bit loading keeps them.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_plugin.build.quantization import quantize_linear

    compute = recipe.resolved_compute_dtype(torch.device(device).type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=compute)
    inner = model.model
    for index, layer in enumerate(inner.layers):
        layer.to_empty(device=device)
        init_layer_(layer, seed + 1 + index)
        if quantize:
            for name, child in list(layer.named_modules()):
                if isinstance(child, torch.nn.Linear):
                    parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
                    setattr(parent, name.rpartition(".")[2], quantize_linear(child, recipe, compute))
        if torch.cuda.is_available() and str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    for offset, module in enumerate([inner.embed_tokens, inner.norm, model.lm_head]):
        module.to_empty(device=device)
        init_layer_(module, seed - 1 - offset)
    with torch.device(device):
        inner.rotary_emb = type(inner.rotary_emb)(config=config)  # buffers computed, not drawn
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
