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

from collections.abc import Mapping
from typing import Any

from qlora_plugin.build.context import RunContext
from qlora_plugin.build.distributed import fsdp_requested
from qlora_plugin.build.quantization import storage_dtype
from qlora_plugin.build.trainer_settings import run_of, settings_for
from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.recipe import QLoRARecipe, recipe_from_spec
from qlora_plugin.integrations.axolotl.section import spec_from_section

LORA_KERNELS = ("lora_qkv_kernel", "lora_o_kernel", "lora_mlp_kernel", "lora_embedding_kernel")
# Native keys that say something the recipe says too, but differently.
DROPPED_IF_SET = ("warmup_steps", "lora_target_linear", "lora_exclude_modules")
DTYPE_NAMES = {"bfloat16", "float16", "float32"}


def recipe_from_section(section: Any) -> QLoRARecipe:
    """Build the recipe a ``qlora:`` section describes; errors name ``qlora.<key>``."""
    return recipe_from_spec(spec_from_section(section))


def fsdp_configured(cfg: Mapping[str, Any]) -> bool:
    """True when an Axolotl config (or the launch) says FSDP.

    A non-empty ``fsdp_config``, or the older ``fsdp`` list; ``fsdp_version`` alone is not FSDP
    in Axolotl's config. The launch: as :func:`qlora_plugin.build.distributed.fsdp_requested`.
    """
    return fsdp_requested(cfg) or bool(cfg.get("fsdp_config"))


def native_keys(recipe: QLoRARecipe, context: RunContext) -> dict[str, Any]:
    """The Axolotl keys that make a run follow ``recipe`` in the run of ``context``.

    The trainer settings are the rows of :data:`qlora_plugin.build.trainer_settings.SETTINGS`
    under Axolotl's key names. Where the run is sharded (FSDP, or DeepSpeed ZeRO-3 through
    ``deepspeed:``) the 4-bit weights are stored in the compute dtype
    (:func:`qlora_plugin.build.quantization.storage_dtype`) and a bitsandbytes optimizer becomes
    torch's AdamW (:func:`qlora_plugin.build.distributed.optimizer_under_fsdp`).
    """
    if recipe.quantizes_targets_itself:  # issue 28's quality options: Axolotl quantizes the base while loading it
        raise QLoRAConfigError(
            "qlora",
            {k: getattr(recipe, k) for k in ("blocksize", "adapter_init", "unquantized_modules")},
            "blocksize other than 64, adapter_init 'loftq' and unquantized_modules need the recipe to quantize the "
            "targets itself, which Axolotl's 4-bit loading does not let it do",
            "leave them at their defaults under Axolotl, or train through TRL (recipe.sft_config)",
        )
    run = run_of(recipe, context)
    storage = str(storage_dtype(recipe, run.compute_dtype, context)).removeprefix("torch.")
    keys: dict[str, Any] = {
        "adapter": "qlora",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_config_kwargs": {
            "bnb_4bit_quant_type": recipe.quant_type,
            "bnb_4bit_use_double_quant": recipe.double_quant,
            "bnb_4bit_quant_storage": storage,
            "bnb_4bit_compute_dtype": str(run.compute_dtype).removeprefix("torch."),
        },
        "lora_r": recipe.r,
        "lora_alpha": recipe.lora_alpha,
        "lora_dropout": recipe.lora_dropout,
        "peft_use_rslora": recipe.use_rslora,
        "peft_use_dora": recipe.use_dora,
        "peft_autocast_adapter_dtype": not recipe.fast_path,
        **settings_for(run, "axolotl"),  # 'offload' checkpointing: the fast path's, on CUDA
    }
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
