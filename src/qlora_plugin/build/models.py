"""Getting hold of a model: on the meta device for discovery, or 4-bit for training."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

from qlora_plugin.build.distributed import rank_device_map
from qlora_plugin.build.lora_layers import context_for
from qlora_plugin.build.moe_experts import quantize_experts
from qlora_plugin.build.moe_loading import experts_load_device, load_with_experts_on_cpu, plan_placement
from qlora_plugin.build.prepare import prepare_for_training
from qlora_plugin.build.quantization import keep_nf4_layout, quantization_config
from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.files import hub_offline, looks_local, read_json, require
from qlora_plugin.core.model_limits import check_model_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from qlora_plugin.core.recipe import QLoRARecipe


def as_model(model: nn.Module | str | os.PathLike[str]) -> nn.Module:
    """``model`` itself (a PEFT model's base), or the model its path names built on the meta device."""
    if isinstance(model, (str, os.PathLike)):
        return meta_model(model)
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model) and hasattr(model, "peft_config"):
        return get_base_model()  # its LoRA layers count as the linear layers they wrap (targets.linear_layer_names)
    return model


def load_config(path: str | os.PathLike[str], field: str = "model") -> PretrainedConfig:
    """Read a model's config: a local directory's ``config.json``, or a hub id where the hub may be asked.

    A local path is read from disk only, each fault named as what it is (:mod:`qlora_plugin.core.files`);
    a hub id while ``HF_HUB_OFFLINE`` is set is read from the hub cache only, and said so when it is not
    there. The sizes are checked before transformers builds anything from them
    (:func:`qlora_plugin.core.model_limits.check_model_config`).
    ``field`` names the input in errors (``model``, ``--base``, ``base_model``).
    """
    name = os.fspath(path)
    local = looks_local(name)
    if local:
        directory = require(name, "directory", field, "pass a directory that holds the model's config.json")
        file = directory / "config.json"
        if not os.path.lexists(file):
            raise QLoRAConfigError(
                field, name, "holds no config.json, so it is no model directory", "pass the model's own directory"
            )
        check_model_config(read_json(file, field, "restore the model's config.json"), os.fspath(file))
        name = os.fspath(directory)
    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as error:  # noqa: BLE001 - transformers and the hub client refuse with many error types
        if local:
            problem = f"its config.json describes no model transformers can build ({type(error).__name__}: "
            raise QLoRAConfigError(
                field, name, problem + f"{_first_line(error)})", "restore the model's original config.json"
            ) from error
        if hub_offline():
            raise QLoRAConfigError(
                field,
                name,
                "is no local directory nor in the hub cache, and HF_HUB_OFFLINE is set, so the hub is not asked",
                "pass a local model directory, or unset HF_HUB_OFFLINE to let the hub be asked for this id",
            ) from error
        raise QLoRAConfigError(
            field,
            name,
            f"is no local directory, and no model config could be read for it as a hub id ({_first_line(error)})",
            "check the id on the hub and your access to it, or pass a local model directory",
        ) from error
    check_model_config(config.to_dict(), f"{os.fspath(path)} config")
    return config


def _first_line(error: BaseException) -> str:
    """The first line of an error's message, cut to a readable length."""
    text = " ".join(str(error).split("\n", 1)[0].split())
    return text if len(text) <= 200 else text[:200] + "..."


def auto_class(config: PretrainedConfig) -> Any:
    """The transformers auto class for a causal LM or a vision-language model."""
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


def meta_model(path: str | os.PathLike[str], field: str = "model") -> nn.Module:
    """Build the model ``path`` describes on the meta device: modules, no weights (``field``: the input, in errors)."""
    return meta_model_of(load_config(path, field), path, field)


def meta_model_of(config: PretrainedConfig, path: str | os.PathLike[str], field: str = "model") -> nn.Module:
    """The model ``config`` (read from ``path``) describes, on the meta device (``field``: the input, in errors)."""
    with torch.device("meta"):
        try:
            return auto_class(config).from_config(config)
        except QLoRAConfigError:
            raise
        except Exception as error:  # noqa: BLE001 - a config transformers read but cannot build a model from
            raise QLoRAConfigError(
                field,
                os.fspath(path),
                f"its config.json describes no model transformers can build ({type(error).__name__}: "
                f"{_first_line(error)})",
                "restore the model's original config.json",
            ) from error


def load_quantized(path: str | os.PathLike[str], recipe: QLoRARecipe, **kwargs: Any) -> PreTrainedModel:
    """Load ``path`` with its linear layers in 4 bits, prepared for training on the recipe's path.

    The recipe's run context (:func:`qlora_plugin.build.lora_layers.context_for`) decides the
    storage of the 4-bit weights and the placement: under a multi-process launch on CUDA the
    model goes to this rank's GPU unless ``kwargs`` has a ``device_map`` or the run is
    DeepSpeed's (:func:`qlora_plugin.build.distributed.rank_device_map`). A mixture-of-experts
    model loaded by one process onto a GPU, without a ``device_map``, gets its fused experts
    loaded on the CPU and stored in 4 bits on the GPU module by module, so they are never all
    there in 16 bits (:mod:`qlora_plugin.build.moe_loading`).
    """
    context = context_for(recipe)
    config = load_config(path)
    device_map = None if context.deepspeed else rank_device_map(context.device, context.launch)
    if device_map is not None:
        kwargs.setdefault("device_map", device_map)
    kwargs.setdefault("quantization_config", quantization_config(recipe, context))
    kwargs.setdefault("dtype", context.compute_dtype)
    model_class = auto_class(config)
    device = experts_load_device(config, context, kwargs)
    placement = None if device is None else plan_placement(meta_model_of(config, path), device)
    if placement is not None:
        model = load_with_experts_on_cpu(model_class, os.fspath(path), recipe, context, placement, kwargs)
    else:
        model = model_class.from_pretrained(os.fspath(path), **kwargs)
    keep_nf4_layout(model)
    quantize_experts(model, recipe, context=context)  # fused MoE experts in 4 bits (where still in 16)
    return prepare_for_training(model, recipe)
