"""The hooks through which plugins extend qlora-plugin.

A plugin is a module or object with functions marked ``@qlora_plugin.hookimpl``
and named like the specifications below. Plugins are found through the
entry-point group ``qlora_plugin`` (see :mod:`qlora_plugin.core.plugins`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    import torch
    from torch import nn

PROJECT_NAME = "qlora_plugin"


class RecipeFields(Protocol):
    """What a hook (and any reader of a recipe) may rely on: the fields a user sets.

    :class:`qlora_plugin.QLoRARecipe` has them; see its fields for their meaning.
    """

    preset: str
    r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: list[str] | str | None
    exclude_modules: list[str] | str | None
    use_rslora: bool
    use_dora: bool
    quant_type: str
    blocksize: int
    double_quant: bool
    compute_dtype: str
    quant_storage: str
    adapter_init: str
    unquantized_modules: list[str] | str | None
    optimizer: str
    learning_rate: float
    max_grad_norm: float
    lr_scheduler_type: str
    warmup_ratio: float
    gradient_checkpointing: bool | str
    num_train_epochs: float | None
    per_device_train_batch_size: int | None
    gradient_accumulation_steps: int | None
    fast_path: bool


hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def qlora_presets() -> dict[str, dict[str, Any]]:
    """Return named presets: ``{name: {recipe field: value}}``.

    Each preset lists only the fields it changes from the recipe's defaults; the
    values are checked like any other recipe input when a recipe is made from it.

    :return: a mapping of preset names to recipe fields (may be empty).

    Called once, when presets are first looked up
    (:func:`qlora_plugin.core.plugins.all_presets`). The results of all plugins are
    merged; two plugins that define the same name are an error naming both.
    """
    return {}  # a specification: pluggy never calls this body


@hookspec(firstresult=True)
def qlora_target_modules(model: nn.Module, recipe: RecipeFields) -> list[str] | None:
    """Return the full names of the modules that get LoRA adapters, or ``None``.

    :param model: the model the recipe meets: a loaded model, or one built on the
        ``meta`` device from its config (modules and shapes, no weights).
    :param recipe: the recipe being resolved; its ``exclude_modules`` are removed
        from the answer afterwards.
    :return: full module names (``model.layers.0.self_attn.q_proj``), or ``None`` to
        leave the model to the next plugin.

    Called when a recipe with ``target_modules="auto"`` meets a model. The first
    non-None answer wins; plugins run before the built-in generic rule, so a plugin
    answers for the architectures it knows and returns ``None`` otherwise.
    """


@hookspec(firstresult=True)
def qlora_quantization_config(
    recipe: RecipeFields, compute_dtype: torch.dtype, storage_dtype: torch.dtype
) -> Any | None:
    """Return the transformers quantization config that loads the base model.

    :param recipe: the recipe whose quantization fields (``quant_type``,
        ``double_quant``) describe the base.
    :param compute_dtype: the resolved compute dtype for the device in use.
    :param storage_dtype: the dtype to store the packed 4-bit weights in: the recipe's
        ``quant_storage``, resolved for the run (the compute dtype where FSDP or DeepSpeed
        ZeRO-3 shards the model). An implementation may leave this argument out.
    :return: a ``transformers`` quantization config, or ``None`` to leave it to the
        next plugin.

    The first non-None answer wins; the built-in answer is a 4-bit
    ``transformers.BitsAndBytesConfig``. Another 4-bit backend plugs in here.
    """
