"""Getting hold of a model: on the meta device for discovery, or 4-bit for training."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from qlora_plugin.core import seams
from qlora_plugin.core.errors import QLoRAConfigError

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel

    from qlora_plugin.core.recipe import QLoRARecipe


def as_model(model: nn.Module | str | os.PathLike[str]) -> nn.Module:
    """``model`` itself, or the model its path names built on the meta device."""
    if isinstance(model, (str, os.PathLike)):
        return meta_model(model)
    return model


def load_config(path: str | os.PathLike[str]) -> PretrainedConfig:
    """Read a model's config (a local directory, or a hub id where a hub is reachable)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(os.fspath(path))
    except (OSError, ValueError) as error:
        raise QLoRAConfigError(
            "model",
            os.fspath(path),
            f"no model config could be read there ({error.__class__.__name__})",
            "pass a directory that holds config.json, or a hub id while the hub is reachable",
        ) from error


def auto_class(config: PretrainedConfig) -> Any:
    """The transformers auto class for a causal LM or a vision-language model."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and hasattr(config, "vision_config"):
        return AutoModelForImageTextToText
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    raise QLoRAConfigError(
        "model",
        config.model_type,
        "is not a causal language model (QLoRA here trains causal LMs)",
        "use a model whose config names a *ForCausalLM or vision-language architecture",
    )


def meta_model(path: str | os.PathLike[str]) -> nn.Module:
    """Build the model ``path`` describes on the meta device: modules, no weights."""
    import torch

    config = load_config(path)
    with torch.device("meta"):
        return auto_class(config).from_config(config)


def load_quantized(path: str | os.PathLike[str], recipe: QLoRARecipe, **kwargs: Any) -> PreTrainedModel:
    """Load ``path`` with its linear layers in 4 bits, prepared for training on the recipe's path.

    Under a multi-process launch on CUDA the model goes to this rank's GPU unless ``kwargs``
    has a ``device_map`` or the launch is DeepSpeed's (:func:`qlora_plugin.core.distributed.rank_device_map`).
    """
    from qlora_plugin.core.device import training_device
    from qlora_plugin.core.distributed import deepspeed_requested, rank_device_map
    from qlora_plugin.core.prepare import prepare_for_training
    from qlora_plugin.core.quantization import keep_nf4_layout

    config = load_config(path)
    device_map = None if deepspeed_requested() else rank_device_map(training_device())
    if device_map is not None:
        kwargs.setdefault("device_map", device_map)
    kwargs.setdefault("quantization_config", recipe.quantization_config())
    kwargs.setdefault("dtype", recipe.resolved_compute_dtype())
    model = auto_class(config).from_pretrained(os.fspath(path), **kwargs)
    keep_nf4_layout(model)
    seams.call("quantize_experts", model, recipe)  # fused MoE experts in 4 bits (qlora_plugin.build.moe_experts)
    return prepare_for_training(model, recipe)
