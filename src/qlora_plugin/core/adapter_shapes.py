"""Adapter weights loaded into a recipe's LoRA layers must have the layers' rank.

Resuming a run's checkpoints with another rank (``r=8`` checkpoints, an ``r=16``
recipe) fails inside torch with one size-mismatch line per adapted layer, thousands
of characters naming no setting. Each LoRA layer the recipe builds checks the
weights coming into it first and raises one :class:`QLoRAConfigError` naming both
ranks and the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qlora_plugin.core.errors import QLoRAConfigError

if TYPE_CHECKING:
    from torch import nn


def guard_adapter_shapes(layer: nn.Module) -> None:
    """Make ``layer`` (a PEFT LoRA layer) refuse, in one line, adapter weights of another rank."""
    layer.register_load_state_dict_pre_hook(_check_incoming)


def _check_incoming(module: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    for adapter, linear in getattr(module, "lora_A", {}).items():
        incoming = state_dict.get(f"{prefix}lora_A.{adapter}.weight")
        shape = getattr(incoming, "shape", None)
        if shape is None or len(shape) != 2 or tuple(shape) == tuple(linear.weight.shape):
            continue
        own, theirs = int(linear.weight.shape[0]), int(shape[0])
        name = prefix.removeprefix("base_model.model.").rstrip(".")
        if own == theirs:
            raise QLoRAConfigError(
                "adapter weights",
                name,
                f"are for a layer {int(shape[1])} wide (lora_A: {tuple(shape)}), this model's is "
                f"{int(linear.weight.shape[1])}: they were trained on another base model",
                "load them onto the base model they were trained on (adapter_config.json's base_model_name_or_path)",
            )
        raise QLoRAConfigError(
            "r",
            own,
            f"the adapter weights being loaded have r={theirs} (lora_A of {name}: {tuple(shape)}), this model's "
            f"adapters r={own}",
            f"resume or load them with r={theirs}, as their qlora_recipe.json records, or start a new run in "
            "another output_dir",
        )
