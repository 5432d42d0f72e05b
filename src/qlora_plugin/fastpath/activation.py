"""The recipe's fast path: which kernels it asks for, and the moment they go on a model.

With ``fast_path=True`` on a CUDA machine, a PEFT model whose adapters the recipe
made trains through :mod:`qlora_plugin.fastpath.kernels` (fused LoRA over NF4, a loss without
logits, Liger norms / SwiGLU / RoPE, the recipe's recompute mode). They are put on
at the model's first training forward: by then the trainer has finished its own
setup (gradient checkpointing, Liger's loss for TRL), which would otherwise undo
them. The trigger is a forward pre-hook, armed when PEFT builds one of the recipe's
4-bit LoRA layers (the ``lora_layer_built`` seam) or by the Axolotl plugin for its
model, and removed as soon as no model is waiting for it (:class:`_Pending`). Every
choice the kernels make is kept on the model they patch. On a machine without CUDA
nothing is armed and the kernels are never imported (``QLORA_FAST_PATH_ON_CPU=1`` runs
their PyTorch references there, for tests).

``gradient_checkpointing`` picks the point between speed and memory:
``False`` -> recompute "none" (fastest), ``True`` -> "full" (each decoder layer
recomputed in backward), ``"offload"`` -> "offload" (as "full", with the kept layer
inputs in pinned host memory: least GPU memory).
"""

from __future__ import annotations

import copy
import logging
import os
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from qlora_plugin.core.notices import log_once
from qlora_plugin.core.patches import allowed

if TYPE_CHECKING:
    from torch import nn

    from qlora_plugin.core.fields import RecipeSpec
    from qlora_plugin.core.recipe import QLoRARecipe
    from qlora_plugin.fastpath.kernels import FastPathReport

RECOMPUTE = {True: "full", False: "none", "offload": "offload"}
# Axolotl's LoRA kernel switches, and the projections each one computes itself.
HOST_KERNEL_LAYERS = {
    "lora_qkv_kernel": ("q_proj", "k_proj", "v_proj"),
    "lora_o_kernel": ("o_proj",),
    "lora_mlp_kernel": ("gate_proj", "up_proj", "down_proj"),
}
_REQUEST = "_qlora_fast_path_request"
_DONE = "_qlora_fast_path_applied"


# Trainer settings of the fast path; each removes a point where the host waits for the GPU,
# after which the GPU idles while the host prepares the next step (docs/performance.md):
# - Trainer's NaN/Inf loss filter reads each step's loss back just after the backward is
#   queued. It only changes what is logged: a NaN or Inf loss is logged as such instead of
#   being replaced by the running average.
# - The batch's copy to the GPU: from pinned memory (Trainer's default) but blocking, it
#   waits for the previous step's backward and optimizer step. ``non_blocking`` lets it
#   queue behind them.
FAST_TRAINER_SETTINGS: dict[str, Any] = {"logging_nan_inf_filter": False, "accelerator_config": {"non_blocking": True}}


def trainer_settings(recipe: QLoRARecipe, device: str | None = None) -> dict[str, Any]:
    """``TrainingArguments`` fields the fast path sets on ``device`` (none off the fast path)."""
    return copy.deepcopy(FAST_TRAINER_SETTINGS) if wants_fast_path(recipe, device) else {}


def apply_trainer_settings(trainer: Any, settings: dict[str, Any]) -> None:
    """Put trainer ``settings`` on a trainer that already exists (Axolotl's hook comes after ``__init__``).

    ``accelerator_config`` fields also go on the trainer's accelerator, which read
    them when it was made; the train dataloader is prepared with them later, in ``train()``.
    """
    for key, value in settings.items():
        if key != "accelerator_config":
            setattr(trainer.args, key, value)
            continue
        if not allowed("trainer-dataloader-config"):
            continue
        for name, field_value in value.items():
            setattr(trainer.args.accelerator_config, name, field_value)
            setattr(trainer.accelerator.dataloader_config, name, field_value)


def recompute_mode(recipe: QLoRARecipe) -> str:
    """The kernels' recompute mode for the recipe's ``gradient_checkpointing``."""
    return RECOMPUTE[recipe.gradient_checkpointing]


# Runs the fast path's pure-PyTorch reference implementations on a CPU: for testing how the
# fast path meets a trainer on machines without a GPU (slower than the stock path there).
CPU_ENV = "QLORA_FAST_PATH_ON_CPU"


def wants_fast_path(recipe: QLoRARecipe, device: str | None = None) -> bool:
    """True when ``recipe`` trains through the kernels on ``device`` (default: the training device).

    Never under FSDP or DeepSpeed ZeRO-3: their sharded layers keep PEFT's forward (one log
    line says so).
    """
    from qlora_plugin.core.device import training_device
    from qlora_plugin.core.distributed import sharding_engine

    device = device or training_device()
    serves = bool(recipe.fast_path) and (device == "cuda" or (device == "cpu" and os.environ.get(CPU_ENV) == "1"))
    engine = sharding_engine(recipe) if serves else None
    if engine:
        log_once(
            logging.INFO,
            f"qlora fast path off: {engine} shards each 4-bit layer, so the layers train through PEFT's forward "
            "(the fused kernels read a layer's whole NF4 weight, gathered only around the layer's own forward)",
            recipe,
        )
        return False
    return serves


def arm(
    model: nn.Module | None = None,
    recipe: QLoRARecipe | None = None,
    host_kernels: Iterable[str] = (),
    own_loss: bool = False,
) -> None:
    """Put the fast path on at the first training forward of a recipe's PEFT model.

    Without ``model``: any PEFT model whose active adapter config is a fast-path
    :class:`QLoRARecipe`. With ``model`` and ``recipe``: that model (a trainer that
    builds its own ``LoraConfig``, as Axolotl does). ``host_kernels``: names of the
    trainer's own LoRA kernels that are on (see :data:`HOST_KERNEL_LAYERS`); the
    layers they compute are left to them. ``own_loss``: the trainer reads only the
    model's ``loss`` in training (never ``logits``), so the fast path may compute it
    without logits; otherwise the loss stays the trainer's (TRL's ``chunked_nll`` and
    Liger's are already logit-free; ``nll``/``dft`` read the logits).
    """
    if model is not None:
        model.__dict__[_REQUEST] = (recipe, tuple(host_kernels), own_loss)
        _pending.models.add(model)
    else:
        _pending.any_recipe_model = True
    _install()


def arm_for_layer(layer: Any, recipe: QLoRARecipe) -> None:
    """Arm the fast path when PEFT builds one of the recipe's LoRA layers on a device the fast path serves."""
    if wants_fast_path(recipe, layer.base_layer.weight.device.type):
        _pending.layers.add(layer)
        _install()


class _Pending:
    """What the first-forward hook waits for; weak references only, so a model never trained is forgotten.

    torch offers a process-wide forward pre-hook and no hook on a model that does not
    exist yet: PEFT builds the LoRA layers (where the recipe learns it is used) before the
    trainer wraps them, and hands the layer factory no model. The hook is installed while
    something is pending and removed as soon as nothing is.
    """

    def __init__(self) -> None:
        self.layers: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self.models: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self.any_recipe_model = False
        self.hook: Any = None

    def __bool__(self) -> bool:
        return bool(self.layers or self.models or self.any_recipe_model)

    def done(self, model: nn.Module) -> None:
        """Forget what ``model`` was waited for by."""
        self.models.discard(model)
        for module in model.modules():
            self.layers.discard(module)
        self.any_recipe_model = False


_pending = _Pending()


def _install() -> None:
    if _pending.hook is None:
        from torch.nn.modules.module import register_module_forward_pre_hook

        _pending.hook = register_module_forward_pre_hook(_first_forward)


def disarm() -> None:
    """Forget every pending model and remove the first-forward hook (a no-op when none is installed)."""
    _pending.layers.clear()
    _pending.models.clear()
    _pending.any_recipe_model = False
    _remove_hook()


def _remove_hook() -> None:
    if _pending.hook is not None:
        _pending.hook.remove()
        _pending.hook = None


def is_armed() -> bool:
    """True while the first-forward hook is installed."""
    return _pending.hook is not None


def _request(module: nn.Module) -> tuple[QLoRARecipe, tuple[str, ...], bool] | None:
    """The (recipe, host kernels, own loss) a module asks the fast path for, or None."""
    explicit = module.__dict__.get(_REQUEST)
    if explicit is not None:
        return explicit
    from peft import PeftModel

    if not isinstance(module, PeftModel):
        return None
    from qlora_plugin.core.recipe import QLoRARecipe

    config = module.peft_config.get(module.active_adapter)
    if isinstance(config, QLoRARecipe) and config.fast_path:
        return config, (), False
    return None


def _first_forward(module: nn.Module, args: Any) -> None:
    if not _pending:
        _remove_hook()
        return
    if not module.training or module.__dict__.get(_DONE):
        return
    request = _request(module)
    if request is None:
        return
    _pending.done(module)
    if not _pending:
        _remove_hook()
    recipe, host_kernels, own_loss = request
    apply_recipe_fast_path(module, recipe, host_kernels=host_kernels, own_loss=own_loss)


def kernel_config(
    recipe: QLoRARecipe,
    device: str,
    *,
    fuse_loss: bool = False,
    loss_stats: bool = False,
    host_kernels: Iterable[str] = (),
) -> Any:
    """The :class:`qlora_plugin.fastpath.kernels.FastPathConfig` the recipe asks for on ``device``.

    ``fuse_loss``: compute the training loss without logits (only where the trainer
    reads nothing else and the model's forward is still its own); ``loss_stats``: the loss's
    output carries TRL's chunked-loss statistics (it replaces TRL's forward); ``host_kernels``:
    the trainer's own LoRA kernels that are on. CUDA graphs go on at the speed point
    (the recompute mode "none") unless the environment sets ``QLORA_CUDA_GRAPHS=0``;
    ``QLORA_PACKED_ATTENTION=0`` leaves packed rows to transformers' masked attention;
    ``QLORA_TILED_MLP`` sets from how many tokens a step's MLPs run tiled (0: never; see
    :func:`tiled_mlp_min_tokens`); ``QLORA_OFFLOAD_KEEP_LAYERS=k`` keeps the first k layer
    inputs on the GPU under offloaded recompute (less host memory).
    """
    from qlora_plugin.fastpath.kernels import FastPathConfig

    host_kernels = tuple(host_kernels)
    mode = recompute_mode(recipe)
    if mode == "offload" and device != "cuda":
        mode = "full"  # host offload needs CUDA streams; recomputing alone still saves the memory
    return FastPathConfig(
        compute_dtype=recipe.resolved_compute_dtype(device),
        fused_loss=fuse_loss,
        loss_stats=loss_stats,
        fused_mlp="lora_mlp_kernel" not in host_kernels,
        recompute=mode,
        cache_block_constants=mode == "none",  # +1/16 of the bf16 weight size: the speed point only
        cuda_graphs=mode == "none" and not host_kernels and os.environ.get("QLORA_CUDA_GRAPHS", "1") != "0",
        packed_attention=os.environ.get("QLORA_PACKED_ATTENTION", "1") != "0",
        tiled_mlp_min_tokens=tiled_mlp_min_tokens(recipe),
        offload_keep_layers=offload_keep_layers(recipe) if mode == "offload" else 0,
        skip_lora=tuple(name for key in host_kernels for name in HOST_KERNEL_LAYERS.get(key, ())),
    )


TILED_MLP_ENV = "QLORA_TILED_MLP"
OFFLOAD_KEEP_ENV = "QLORA_OFFLOAD_KEEP_LAYERS"


def tiled_mlp_min_tokens(recipe: QLoRARecipe | RecipeSpec) -> int:
    """From how many tokens a step's MLPs run tiled: ``QLORA_TILED_MLP`` (whole number, 0 = never), or the default."""
    from qlora_plugin.fastpath.tiling_defaults import TILED_MLP_MIN_TOKENS

    return _env_count(TILED_MLP_ENV, TILED_MLP_MIN_TOKENS, recipe, "the MLPs tile from that many tokens (0: never)")


def offload_keep_layers(recipe: QLoRARecipe | RecipeSpec) -> int:
    """Layers whose inputs stay on the GPU under offloaded recompute: ``QLORA_OFFLOAD_KEEP_LAYERS`` (default 0)."""
    return _env_count(OFFLOAD_KEEP_ENV, 0, recipe, "the first that many layers keep their inputs on the GPU")


def _env_count(name: str, default: int, recipe: QLoRARecipe | RecipeSpec, meaning: str) -> int:
    """A whole number >= 0 from the environment variable ``name``, else ``default`` (a bad value: one warning)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return max(int(value), 0)
    except ValueError:
        log_once(
            logging.WARNING,
            f"{name}={value!r} is not a whole number ({meaning}); using {default}",
            recipe,
        )
        return default


def apply_recipe_fast_path(
    model: Any, recipe: QLoRARecipe, *, host_kernels: Iterable[str] = (), own_loss: bool = False
) -> FastPathReport:
    """Put the recipe's fast path on ``model`` (a PEFT model) now, and report it once.

    ``own_loss``: see :func:`arm`.
    """
    from qlora_plugin.fastpath.kernels import apply_fast_path

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(base.parameters()).device.type
    forward_owner = loss_forward_owner(base)
    replace_trl = forward_owner == "trl-chunked" and allowed("trl-chunked-loss-forward")
    config = kernel_config(
        recipe,
        device,
        fuse_loss=(own_loss and forward_owner is None) or replace_trl,
        loss_stats=replace_trl,
        host_kernels=host_kernels,
    )
    result = apply_fast_path(model, config=config)
    model.__dict__[_DONE] = True
    from qlora_plugin.core.run_record import model_format

    trained = model_format(base)
    log_once(
        logging.INFO,
        describe(
            result,
            config,
            recipe,
            loss_description(result, forward_owner, own_loss),
            tuple(host_kernels),
            trained.quant_type if trained is not None else recipe.quant_type,
        ),
        recipe,
    )
    if forward_owner is None and not result.loss_fused and not own_loss:
        log_once(logging.WARNING, FULL_LOGITS_WARNING, recipe)
    return result


# The one setting that costs a user's own SFTConfig most beside the README's recipe.sft_config().
FULL_LOGITS_WARNING = (
    "qlora: the training loss is computed from full logits (TRL's loss_type='nll' or 'dft', or your own loop): "
    "one float per vocabulary entry and token, slower and several GiB more than a loss without logits; with TRL, "
    "leave loss_type unset (chunked_nll, which the fast path computes without logits) or set use_liger_kernel=True"
)


def loss_forward_owner(causal_lm: nn.Module) -> str | None:
    """Whose logit-free loss replaced the model's forward: ``"liger"``, ``"trl-chunked"`` (TRL's
    ``chunked_nll``), ``"trl"`` (TRL's fused LM head), or None (the model's own forward).

    Told by where the forward's code lives: TRL's replacement copies the model's name and
    module onto itself (``functools.wraps``), its code object keeps TRL's file and name.
    """
    func = getattr(causal_lm.forward, "__func__", causal_lm.forward)
    code = getattr(func, "__code__", None)
    path = code.co_filename.replace("\\", "/") if code is not None else ""
    if "/liger_kernel/" in path:
        return "liger"
    if "/trl/" in path:
        return "trl-chunked" if code is not None and code.co_name == "_chunked_ce_forward" else "trl"
    return None


def loss_description(result: Any, forward_owner: str | None, own_loss: bool) -> str:
    """Where the training loss comes from, for the fast path's log line."""
    if forward_owner == "liger":
        return "loss without logits: Liger's fused linear cross-entropy (the trainer's use_liger_kernel)"
    if forward_owner == "trl-chunked" and result.loss_fused:
        return (
            "loss without logits: the plugin's in place of TRL's chunked_nll (the same loss, token accuracy and "
            "entropy, from bf16 head GEMMs done once)"
        )
    if forward_owner in ("trl", "trl-chunked"):
        return "loss without logits: TRL's own (chunked_nll, or its fused LM head)"
    if result.loss_fused:
        return "loss without logits: the plugin's"
    if own_loss:
        return "loss from full logits (this model's output head is not supported without them)"
    return "loss from full logits: left to the trainer, which reads them (TRL loss_type 'nll'/'dft', or your own loop)"


def describe(
    result: Any, config: Any, recipe: QLoRARecipe, loss: str, host_kernels: tuple[str, ...], quant_type: str = ""
) -> str:
    """One line: which parts of the fast path are on (``quant_type``: the base's, as loaded)."""
    dropout = f", LoRA dropout {recipe.lora_dropout}" if recipe.lora_dropout else ""
    parts = [
        f"fused LoRA over {quant_type or recipe.quant_type} on {result.lora_layers_fused} layers{dropout}",
        loss,
        f"RMSNorm on {result.norms_patched}, SwiGLU on {result.mlps_patched}, RoPE on {result.rope_patched} modules",
        f"recompute '{config.recompute}' (gradient_checkpointing={recipe.gradient_checkpointing!r})"
        + (
            f", the first {config.offload_keep_layers} layer inputs kept on the GPU"
            if getattr(config, "offload_keep_layers", 0)
            else ""
        ),
        *(
            [f"CUDA graphs over {result.graphed_layers} decoder layers once batches repeat a shape"]
            if result.graphed_layers
            else []
        ),
        *(["packed rows attended per sequence (no block-diagonal mask)"] if result.packed_attention else []),
        *(
            [
                f"MLPs tiled in slices of {config.tiled_mlp_rows} tokens for steps of at least "
                f"{config.tiled_mlp_min_tokens} tokens"
            ]
            if getattr(result, "tiled_mlps", 0)
            else []
        ),
        f"frozen weights in {str(config.compute_dtype).removeprefix('torch.')}, adapters kept fp32",
    ]
    if host_kernels:
        parts.append(f"left to the trainer's own kernels: {', '.join(host_kernels)}")
    return "qlora fast path on: " + "; ".join(parts)


def optimizer_cls_and_kwargs(recipe: QLoRARecipe, args: Any = None) -> tuple[type, dict[str, Any]] | None:
    """``(PagedAdamW, kwargs)`` where the recipe's paged AdamW 32-bit runs fused, else None.

    Same update and paged 32-bit moments as bitsandbytes' ``PagedAdamW32bit``, one
    multi-tensor step instead of a kernel and a device synchronisation per tensor.
    ``args``: a ``TrainingArguments`` whose learning rate, betas and eps are used.
    """
    if not wants_fast_path(recipe) or recipe.optimizer != "paged_adamw_32bit":
        return None
    from qlora_plugin.core.device import training_device
    from qlora_plugin.fastpath.kernels import PagedAdamW
    from qlora_plugin.fastpath.kernels.optim import paged_states_available

    if training_device() == "cuda" and not paged_states_available():
        return None

    kwargs: dict[str, Any] = {"lr": recipe.learning_rate}
    if args is not None:
        kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    return PagedAdamW, kwargs
