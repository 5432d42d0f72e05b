"""TRL integration: the recipe's trainer settings as an ``SFTConfig``.

Use::

    recipe = qlora_recipe()
    trainer = SFTTrainer(model="path/or/id", args=recipe.sft_config(output_dir="out"),
                         train_dataset=ds, peft_config=recipe)

``peft_config=recipe`` puts the adapters on the discovered targets over a 4-bit
base; ``args=recipe.sft_config(...)`` brings the rest: 4-bit loading of a model
given by name, paged AdamW, non-reentrant gradient checkpointing, the clip
norm, the schedule, and precision chosen for the device. On CUDA with the
recipe's ``fast_path``, the loss is computed without logits by Liger through
TRL's own ``use_liger_kernel``, Trainer's NaN/Inf loss filter is off and the
batch's copy to the GPU is non-blocking (both kept the host waiting for the GPU; see
:data:`qlora_plugin.build.trainer_settings.FAST_TRAINER_SETTINGS`); the rest of the fast path goes on
at the first training forward. For the fused paged AdamW,
also pass ``optimizer_cls_and_kwargs=recipe.optimizer_cls_and_kwargs(args)``.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING, Any

from trl import SFTConfig
from trl.trainer import utils as trl_utils

from qlora_plugin.build.context import RunContext, attach, make_context
from qlora_plugin.build.distributed import deepspeed_requested, fsdp_requested, rank_device_map, zero3_requested
from qlora_plugin.build.quantization import quantization_config
from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.integrations.trainer_checks import check_sft_overrides
from qlora_plugin.integrations.transformers import describe_settings, settings_of

if TYPE_CHECKING:
    from qlora_plugin.core.recipe import QLoRARecipe


def sft_config(recipe: QLoRARecipe, /, **overrides: Any) -> SFTConfig:
    """An ``SFTConfig`` holding the recipe's settings; ``overrides`` win and are reported.

    ``overrides`` are checked first (:mod:`qlora_plugin.integrations.trainer_checks`). The run
    context is made here, from ``overrides`` and the launch (:mod:`qlora_plugin.build.context`),
    and travels with the config, never with the recipe: the LoRA layers a trainer given this
    config builds are built in it, its ``seed`` (the config's) seeds the adapters, and one recipe
    behind several configs gives each its own run. Under a multi-process launch on CUDA, a model
    given by name loads on this rank's GPU (``device_map={"": local_rank}`` unless
    ``model_init_kwargs`` has a ``device_map``, or under DeepSpeed, which places the parameters
    itself: ``device_map=None``); with ``fsdp`` in ``overrides`` (or ``accelerate launch`` with an
    FSDP config), or a DeepSpeed ZeRO-3 config in ``deepspeed`` (or ``accelerate launch`` with
    one), the 4-bit weights are stored in the compute dtype, the fast path's kernels stay off and
    a bitsandbytes optimizer becomes torch's AdamW (:mod:`qlora_plugin.build.distributed`). A call
    that fails leaves nothing behind: the recipe is never written to.
    """
    check_sft_overrides(overrides, SFTConfig)
    context = make_context(
        recipe,
        fsdp=fsdp_requested(overrides),
        zero3=zero3_requested(overrides),
        deepspeed=deepspeed_requested(overrides),
        seed=overrides.get("seed"),
    )
    settings = settings_of(recipe, context)
    settings.update(liger_loss_settings(context, overrides=overrides))
    loading = {"quantization_config": quantization_config(recipe, context), "dtype": context.compute_dtype}
    if loading["quantization_config"] is None:  # the recipe quantizes the targets itself (blocksize, loftq, ...)
        del loading["quantization_config"]
    user_loading = dict(overrides.pop("model_init_kwargs", None) or {})
    if "device_map" in user_loading:
        pass  # the user's
    elif context.deepspeed:
        loading["device_map"] = None  # DeepSpeed places the parameters; transformers refuses "auto" there
    elif (device_map := rank_device_map(context.device, context.launch)) is not None:
        loading["device_map"] = device_map  # each rank loads the whole 4-bit model on its own GPU

    replaced = {key: value for key, value in overrides.items() if key in settings and settings[key] != value}
    replaced.update({f"model_init_kwargs[{key!r}]": value for key, value in user_loading.items() if key in loading})
    config = _build_config({**settings, **overrides, "model_init_kwargs": {**loading, **user_loading}}, overrides)
    context.seed = config.seed
    attach(config, context)  # the trainer given this config builds its LoRA layers in this run

    active = {key: value for key, value in settings.items() if key not in replaced}
    quantization = {**loading, **user_loading}.get("quantization_config")
    message = (
        f"qlora recipe '{recipe.preset}' in SFTConfig: models given by name load as "
        + (
            f"16-bit, their targets then quantized by the recipe to 4-bit {recipe.quant_type} (blocksize "
            f"{recipe.blocksize}, double quant {recipe.double_quant})"
            if quantization is None and recipe.quantizes_targets_itself
            else describe_quantization(quantization)
        )
        + f"; {describe_settings(active)}"
    )
    if replaced:
        message += f". Not in effect, replaced by your arguments: {describe_settings(replaced)}"
    context.say_once(logging.WARNING if replaced else logging.INFO, message)  # each call's run says what it made
    return config


def _build_config(arguments: dict[str, Any], overrides: dict[str, Any]) -> SFTConfig:
    """TRL's ``SFTConfig`` from ``arguments``; a combination it refuses is one line naming the caller's arguments."""
    try:
        return SFTConfig(**arguments)
    except Exception as error:  # noqa: BLE001 - TRL and transformers refuse combinations with many error types
        first = " ".join(str(error).split("\n", 1)[0].split())
        named = sorted(key for key in overrides if key in str(error)) or sorted(overrides)
        raise QLoRAConfigError(
            f"sft_config({', '.join(named)})",
            {key: overrides[key] for key in named},
            f"TRL's SFTConfig refuses these arguments: {first[:300]}",
            "change the arguments it names, or leave them out for the recipe's settings",
        ) from error


def describe_quantization(quantization: Any) -> str:
    """``4-bit nf4 (double quant True, compute bfloat16)`` for a 4-bit ``BitsAndBytesConfig``, in words otherwise."""
    if not getattr(quantization, "load_in_4bit", False):
        return type(quantization).__name__ if quantization is not None else "16-bit (no quantization)"
    compute = str(getattr(quantization, "bnb_4bit_compute_dtype", None)).removeprefix("torch.")
    return (
        f"4-bit {quantization.bnb_4bit_quant_type} (double quant {quantization.bnb_4bit_use_double_quant}, "
        f"compute {compute})"
    )


def trl_computes_loss_without_logits() -> bool:
    """True for TRL releases whose SFTTrainer always projects through its own fused LM head (1.1x and later)."""
    return hasattr(trl_utils, "add_fused_lm_head")


def liger_loss_settings(
    context: RunContext, device: str | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """On the CUDA fast path with Liger installed: Liger's fused linear cross-entropy through TRL's switch.

    With it, Liger's forward returns the loss and the token accuracy without logits
    (TRL 1.9's ``nll`` and ``dft`` losses read full logits). Norms, SwiGLU and RoPE stay the
    fast path's. Without Liger, or where the user picks ``loss_type="chunked_nll"``
    (which TRL refuses beside Liger), TRL's own chunked loss is logit-free too; TRL
    releases with a fused LM head compute every loss without logits and refuse Liger's.
    """
    device = device or context.device
    overrides = overrides or {}
    if not context.fast_path_on(device) or device != "cuda" or importlib.util.find_spec("liger_kernel") is None:
        return {}
    if trl_computes_loss_without_logits():
        return {}
    if overrides.get("loss_type") == "chunked_nll" or overrides.get("use_liger_kernel") is False:
        return {}
    only_the_loss = {
        "fused_linear_cross_entropy": True,
        "cross_entropy": False,
        "rope": False,
        "rms_norm": False,
        "swiglu": False,
    }
    return {"use_liger_kernel": True, "liger_kernel_config": only_the_loss}
