"""Turn a ``qlora:`` section into Axolotl's own config keys.

Policy for native keys that contradict the section: the section wins. Each
such key is replaced and named in a warning with its old and new value, so an
existing LoRA or full fine-tune config becomes QLoRA by adding the section.
``lora_target_modules`` follows the same rule, whether or not its names exist
in the model: targets are chosen in the section (``qlora.target_modules``),
where names that match no linear layer are an error listing those that exist.
Malformed sections (unknown key, wrong type, unknown preset) are errors raised
before any model is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qlora_plugin.core.section import SECTION, in_section, spec_from_section  # noqa: F401 - in_section used by plugin.py

if TYPE_CHECKING:
    from qlora_plugin.core.recipe import QLoRARecipe

LORA_KERNELS = ("lora_qkv_kernel", "lora_o_kernel", "lora_mlp_kernel", "lora_embedding_kernel")
# Native keys that say something the recipe says too, but differently.
DROPPED_IF_SET = ("warmup_steps", "lora_target_linear", "lora_exclude_modules")
DTYPE_NAMES = {"bfloat16", "float16", "float32"}


def recipe_from_section(section: Any) -> QLoRARecipe:
    """Build the recipe a ``qlora:`` section describes; errors name ``qlora.<key>``."""
    from qlora_plugin.core.recipe import recipe_from_spec

    return recipe_from_spec(spec_from_section(section))


def native_keys(recipe: QLoRARecipe, device: str, fsdp: bool = False, zero3: bool = False) -> dict[str, Any]:
    """The Axolotl keys that make a run follow ``recipe`` on ``device``.

    ``fsdp``, ``zero3``: the config shards the model with FSDP, or with DeepSpeed ZeRO-3
    (``deepspeed:``); the 4-bit weights are then stored in
    the compute dtype (:func:`qlora_plugin.core.quantization.storage_dtype`) and a
    bitsandbytes optimizer becomes torch's AdamW
    (:func:`qlora_plugin.core.distributed.optimizer_under_fsdp`).
    """
    from qlora_plugin.core.device import precision_flags
    from qlora_plugin.core.distributed import optimizer_under_fsdp
    from qlora_plugin.core.quantization import storage_dtype

    if recipe.quantizes_targets_itself:  # issue 28's quality options: Axolotl quantizes the base while loading it
        from qlora_plugin.core.errors import QLoRAConfigError

        raise QLoRAConfigError(
            "qlora",
            {k: getattr(recipe, k) for k in ("blocksize", "adapter_init", "unquantized_modules")},
            "blocksize other than 64, adapter_init 'loftq' and unquantized_modules need the recipe to quantize the "
            "targets itself, which Axolotl's 4-bit loading does not let it do",
            "leave them at their defaults under Axolotl, or train through TRL (recipe.sft_config)",
        )
    compute_dtype = recipe.resolved_compute_dtype(device)
    storage = str(storage_dtype(recipe, compute_dtype, fsdp, zero3)).removeprefix("torch.")
    keys: dict[str, Any] = {
        "adapter": "qlora",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_config_kwargs": {
            "bnb_4bit_quant_type": recipe.quant_type,
            "bnb_4bit_use_double_quant": recipe.double_quant,
            "bnb_4bit_quant_storage": storage,
            "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
        },
        "lora_r": recipe.r,
        "lora_alpha": recipe.lora_alpha,
        "lora_dropout": recipe.lora_dropout,
        "peft_use_rslora": recipe.use_rslora,
        "peft_use_dora": recipe.use_dora,
        "peft_autocast_adapter_dtype": not recipe.fast_path,
        "optimizer": optimizer_under_fsdp(recipe.optimizer) if fsdp or zero3 else recipe.optimizer,
        "learning_rate": recipe.learning_rate,
        "max_grad_norm": recipe.max_grad_norm,
        "lr_scheduler": recipe.lr_scheduler_type,
        "warmup_ratio": recipe.warmup_ratio,
        "gradient_checkpointing": bool(recipe.gradient_checkpointing),  # 'offload': the fast path's, on CUDA
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if recipe.gradient_checkpointing else None,
        **precision_flags(compute_dtype, device),
    }
    optional = {
        "num_epochs": recipe.num_train_epochs,
        "micro_batch_size": recipe.per_device_train_batch_size,
        "gradient_accumulation_steps": recipe.gradient_accumulation_steps,
    }
    keys.update({key: value for key, value in optional.items() if value is not None})
    if recipe.target_parameters:  # fused MoE experts, found on the model (qlora_plugin.core.experts)
        keys["lora_target_parameters"] = sorted(recipe.target_parameters)
    if not recipe.targets_are_auto:  # names (sorted), or a pattern the loaded model resolves
        targets = recipe.target_modules
        assert targets is not None  # the field checks never leave it None
        keys["lora_target_modules"] = targets if isinstance(targets, str) else sorted(targets)
    return keys


def apply_keys(cfg: dict[str, Any], keys: dict[str, Any]) -> list[str]:
    """Write ``keys`` into ``cfg``; return one warning per native value replaced."""
    warnings = []
    for key, value in keys.items():
        if isinstance(value, dict):
            current = dict(cfg.get(key) or {})
            for inner, inner_value in value.items():
                if inner in current and not _agrees(current[inner], inner_value):
                    warnings.append(_replaced(f"{key}.{inner}", current[inner], inner_value))
                current[inner] = inner_value
            cfg[key] = current
            continue
        if cfg.get(key) is not None and not _agrees(cfg[key], value):
            warnings.append(_replaced(key, cfg[key], value))
        cfg[key] = value
    for key in DROPPED_IF_SET:
        if cfg.get(key):
            warnings.append(_replaced(key, cfg[key], None))
            cfg[key] = None
    return warnings


def keep_lora_kernels_on_cuda(cfg: dict[str, Any], device: str) -> list[str]:
    """Axolotl's LoRA kernels are Triton/CUDA code: turn them off on a CPU, leave them on a GPU."""
    if device == "cuda":
        return []
    warnings = [_replaced(key, cfg[key], False) + " (they need CUDA)" for key in LORA_KERNELS if cfg.get(key)]
    cfg.update({key: False for key in LORA_KERNELS})
    return warnings


def _agrees(native: Any, ours: Any) -> bool:
    if native == "auto" and isinstance(ours, bool):
        return True  # bf16: auto resolves to the same decision on this device
    if isinstance(native, str) and isinstance(ours, str) and native.removeprefix("torch.") == ours:
        return True
    if isinstance(native, (list, tuple, set)) and isinstance(ours, (list, tuple, set)):
        return sorted(native) == sorted(ours)
    return native == ours


def _replaced(key: str, old: Any, new: Any) -> str:
    message = f"qlora section: `{key}: {old!r}` in the config is replaced by {new!r}"
    if key == "lora_target_modules":
        message += " (the section's targets win; to choose them, set qlora.target_modules)"
    return message
