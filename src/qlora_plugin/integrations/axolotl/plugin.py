"""QLoRAPlugin: one ``qlora:`` section makes an Axolotl run QLoRA.

``register`` (raw config, before Axolotl validates it) expands the section
into Axolotl's own keys, so Axolotl's validation and loader do the work.
``pre_lora_load`` (real model in hand) discovers the target modules through
the plugin hooks (on a mixture-of-experts model it also stores the fused experts in 4
bits and targets them through ``lora_target_parameters``), seeds the adapters'
initialisation from ``seed``, puts the base
on the recipe's path, and saves the expanded config with the targets written out
and ``qlora_recipe.json`` beside it (and, through :class:`CheckpointGuard`, in
every checkpoint, which is complete or absent). ``load_datasets`` runs the data
preflight (:mod:`qlora_plugin.integrations.axolotl.data_checks`) before Axolotl reads any data. On
CUDA with the recipe's ``fast_path``, ``post_lora_load`` arms the kernels for the
first training forward and ``post_trainer_create`` gives the trainer the fused
paged AdamW. A rejected section or dataset ends the process with one line
(:mod:`qlora_plugin.integrations.exit_summary`).

Axolotl's own LoRA kernels (``lora_qkv_kernel``, ``lora_o_kernel``,
``lora_mlp_kernel``) stay as the config sets them on a GPU. The projections one
of them computes are left to it (the plugin does not fuse those LoRA layers, nor
patch the MLP under ``lora_mlp_kernel``), so no layer is patched twice; the rest
of the fast path (loss, norms, RoPE, recompute, the other projections) still applies.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import yaml
from axolotl.integrations.base import BasePlugin

from qlora_plugin.build.context import RunContext, make_context
from qlora_plugin.build.distributed import zero3_requested
from qlora_plugin.build.fsdp_bytes import guard_packed_model
from qlora_plugin.build.models import meta_model
from qlora_plugin.build.moe_experts import quantize_experts
from qlora_plugin.build.prepare import prepare_for_training
from qlora_plugin.build.quantization import keep_nf4_layout
from qlora_plugin.build.seeding import seed_before_adapters
from qlora_plugin.build.trainer_settings import fast_trainer_settings
from qlora_plugin.core import patches
from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.experts import check_experts
from qlora_plugin.core.files import looks_local
from qlora_plugin.core.model_limits import check_sequence_length
from qlora_plugin.core.recipe import QLoRARecipe, write_recipe_file
from qlora_plugin.core.run_record import model_format
from qlora_plugin.core.safe_io import write_text_atomically
from qlora_plugin.core.yaml_strict import duplicate_key
from qlora_plugin.fastpath.activation import arm
from qlora_plugin.integrations import exit_summary
from qlora_plugin.integrations.axolotl.data_checks import check_datasets
from qlora_plugin.integrations.axolotl.expand import (
    LORA_KERNELS,
    apply_keys,
    fsdp_configured,
    keep_lora_kernels_on_cuda,
    native_keys,
    recipe_from_section,
)
from qlora_plugin.integrations.axolotl.section import SECTION, check_axolotl_keys, in_section, misplaced_section
from qlora_plugin.integrations.checkpoints import CheckpointGuard, check_resume, resume_checkpoint
from qlora_plugin.integrations.transformers import describe_settings, fused_optimizer_over

AXOLOTL_LOGGER = "axolotl.integrations.qlora_plugin"  # Axolotl shows INFO only under its own namespace
_log = logging.getLogger(AXOLOTL_LOGGER)
EXPANDED_CONFIG = "qlora_expanded.yml"
NOT_RERUN = (SECTION, "plugins", "axolotl_config_path")  # left out of the saved, plugin-free config


class QLoRAPlugin(BasePlugin):
    """Axolotl plugin for ``plugins: [qlora_plugin.axolotl.QLoRAPlugin]``.

    One run context (:mod:`qlora_plugin.build.context`) is made in :meth:`register` from the
    config and kept for the run: the key expansion, the base's preparation, the fast path's
    request on the model and the trainer's settings all read it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.section_recipe: QLoRARecipe | None = None  # as the section says: targets may still be "auto"
        self.recipe: QLoRARecipe | None = None  # with the targets found on the real model
        self.context: RunContext | None = None
        self.expanded: dict[str, Any] = {}

    def get_input_args(self) -> str:
        return "qlora_plugin.integrations.axolotl.args.QLoRAArgs"

    def register(self, cfg: dict[str, Any]) -> None:
        """Check the section, make the run's context and write the section's native keys into ``cfg``."""
        exit_summary.install()
        check_structure(cfg)
        self.section_recipe = recipe_from_section(cfg.get(SECTION))
        self.context = make_context(
            self.section_recipe,
            fsdp=fsdp_configured(cfg),
            zero3=zero3_requested(cfg),  # `deepspeed:` a ZeRO-3 config (its JSON file or its keys)
            seed=cfg.get("seed"),
            logger_name=AXOLOTL_LOGGER,
        )
        recipe = self._discover_from_config(cfg.get("base_model"), cfg.get("sequence_len"))
        try:
            keys = native_keys(recipe, self.context)
        except QLoRAConfigError as error:  # e.g. qlora.quant_storage: uint8 under FSDP or ZeRO-3
            raise in_section(error) from error
        for warning in apply_keys(cfg, keys) + keep_lora_kernels_on_cuda(cfg, self.context.device):
            _log.warning(warning)
        self.expanded = _plain(cfg)

    def load_datasets(self, cfg: Any, preprocess: bool = False) -> None:
        """Check the configured data before Axolotl reads it; Axolotl then loads it as usual (None)."""
        found = check_datasets(cfg)
        for warning in found.warnings:
            _log.warning("qlora: %s", warning)
        for note in found.notes:
            _log.info("qlora: %s", note)
        if found.errors:
            raise found.errors[0]

    def pre_lora_load(self, cfg: Any, model: Any) -> None:
        """Discover the targets on the real model, seed the adapters and ready the base for training."""
        assert self.section_recipe is not None and self.context is not None  # register ran first
        keep_nf4_layout(model)
        recipe = self.recipe = self.section_recipe.resolve(model)
        resumed = resume_checkpoint(cfg)
        if resumed is not None:  # before Axolotl loads its weights: a clear line, not a torch size mismatch
            check_resume(resumed, model, recipe.r)
        self._experts_in_4bit(cfg, model, recipe)
        guard_packed_model(model, self.context)  # under FSDP: 4-bit codes all-gathered as bytes
        assert recipe.target_modules is not None and not isinstance(recipe.target_modules, str)  # exact names
        targets = sorted(recipe.target_modules)
        base = model_format(model)
        listed = Path(cfg.output_dir) / EXPANDED_CONFIG  # written below, with the targets by name
        _log.info(
            "qlora: LoRA on %d modules over a %s base (lora_target_modules in %s)",
            len(targets),
            base.describe() if base is not None else "16-bit",
            listed,
        )
        native = cfg.get("lora_target_modules")
        if native and sorted([native] if isinstance(native, str) else native) != targets:
            _log.warning(
                "qlora section: `lora_target_modules: %r` in the config is replaced by the "
                "section's targets (to choose them, set qlora.target_modules)",
                native,
            )
        cfg.lora_target_modules = targets
        cfg.lora_target_linear = False
        if recipe.fast_path:
            prepare_for_training(model, recipe)
        seed_before_adapters(self.context.seed)
        self.expanded["lora_target_modules"] = targets
        self._save_outputs(Path(cfg.output_dir), model)

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list[Any]:
        """The checkpoint guard: checkpoints complete or absent, each with the recipe; resume skips broken ones."""
        return [CheckpointGuard(self.recipe, self.context)] if self.recipe is not None else []

    def post_train(self, cfg: Any, model: Any) -> None:
        """The recipe beside the final adapter too (Axolotl may have rewritten the output directory)."""
        if self.recipe is not None and Path(cfg.output_dir).is_dir():
            write_recipe_file(self.recipe, cfg.output_dir, model)

    def post_lora_load(self, cfg: Any, model: Any) -> None:
        """Check a mixture-of-experts model's experts; on CUDA with the fast path, put the kernels on at the
        model's first training forward.

        Axolotl's supervised trainer reads only the model's loss in training, so the fast
        path may compute it without logits; preference training (``rl``) and ORPO read
        logits and keep the model's own loss.
        """
        if self.recipe is None or self.context is None:
            return
        check_experts(model, self.recipe)  # MoE experts in 4 bits and adapted as the recipe says
        if not self.context.fast_path_on():
            return
        own_loss = not cfg.get("rl") and not cfg.get("orpo_alpha")
        host_kernels = [key for key in LORA_KERNELS if cfg.get(key)]
        arm(model, self.recipe, self.context, host_kernels=host_kernels, own_loss=own_loss)

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        """On the CUDA fast path: the fast path's trainer settings, and the fused paged AdamW.

        The settings (:data:`qlora_plugin.build.trainer_settings.FAST_TRAINER_SETTINGS`) have no
        Axolotl key, so they go on the trainer here (its arguments, and its accelerator's
        dataloader configuration for the batch's copy). The optimizer is set as the
        trainer's ``optimizer_cls_and_kwargs`` where the recipe asks for paged AdamW
        32-bit (Axolotl 0.19 never calls the plugins' ``create_optimizer``); the
        trainer still groups the parameters.
        """
        if self.recipe is None or self.context is None:
            return
        settings = fast_trainer_settings(self.context)
        apply_trainer_settings(trainer, settings)
        if settings:
            _log.info("qlora: trainer settings of the fast path: %s", describe_settings(settings))
        if getattr(trainer, "optimizer", None) is not None:
            return
        chosen = fused_optimizer_over(trainer.model, self.context, trainer.args)
        if chosen is not None:
            trainer.optimizer_cls_and_kwargs = chosen

    def _experts_in_4bit(self, cfg: Any, model: Any, recipe: QLoRARecipe) -> None:
        """Store a mixture-of-experts model's fused experts in 4 bits and hand Axolotl their LoRA targets."""
        if quantize_experts(model, recipe, context=self.context):
            _log.info("qlora: mixture-of-experts experts stored in 4 bits (%s)", recipe.quant_type)
        parameters = sorted(recipe.target_parameters or [])
        if parameters:
            _log.info("qlora: LoRA on %d fused expert parameters", len(parameters))
            cfg.lora_dropout = recipe.lora_dropout
        cfg.lora_target_parameters = parameters or None
        self.expanded["lora_target_parameters"] = parameters or None
        self.expanded["lora_dropout"] = recipe.lora_dropout

    def _discover_from_config(self, base_model: Any, sequence_len: Any = None) -> QLoRARecipe:
        """The section's recipe with targets found from the model's config (meta device).

        The real model confirms them in ``pre_lora_load``; where the config
        cannot be read now (a hub id while offline), discovery waits for it. ``sequence_len``
        is checked against the model's positions here too.
        """
        assert self.section_recipe is not None
        if not base_model:
            return self.section_recipe
        try:
            model = meta_model(str(base_model), "base_model")
        except (OSError, QLoRAConfigError) as error:
            if looks_local(str(base_model)) and isinstance(error, QLoRAConfigError):
                raise  # a local path is read from disk only: what is wrong with it is said now
            _log.info("qlora: target discovery waits for the loaded model (%s)", error)
            return self.section_recipe
        config: Any = model.config  # a transformers PretrainedConfig
        warning = check_sequence_length(sequence_len, "sequence_len", config.to_dict(), type(model).__name__)
        if warning:
            _log.warning("qlora: %s", warning)
        try:
            return self.section_recipe.resolve(model)
        except QLoRAConfigError as error:
            raise in_section(error) from error

    def _save_outputs(self, output_dir: Path, model: Any) -> None:
        """Write the config as plain Axolotl keys (no plugin needed to rerun it) and the recipe, atomically."""
        assert self.recipe is not None
        plain = {key: value for key, value in self.expanded.items() if key not in NOT_RERUN}
        plain = {key: value for key, value in plain.items() if value is not None}
        output_dir.mkdir(parents=True, exist_ok=True)
        header = (
            f"# Written by qlora-plugin from the `{SECTION}:` section; targets as discovered on the model.\n"
            "# Runs without the plugin: `axolotl train` this file.\n"
        )
        write_text_atomically(output_dir / EXPANDED_CONFIG, header + yaml.safe_dump(plain, sort_keys=True))
        write_recipe_file(self.recipe, output_dir, model)


def check_structure(cfg: Any) -> None:
    """Refuse a config whose structure Axolotl would read silently otherwise: a key given twice in its YAML file
    (the last one wins), a ``qlora:`` section nested where Axolotl never reads it, or a key the plugin reads
    holding the wrong kind of value (Axolotl validates its keys only after the plugin has used them)."""
    path = cfg.get("axolotl_config_path")
    if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as handle:
            found = duplicate_key(handle.read(), os.fspath(path))
        if found is not None:
            raise found
    plain = _plain(cfg)
    found = misplaced_section(plain) or check_axolotl_keys(plain)
    if found is not None:
        raise found


def apply_trainer_settings(trainer: Any, settings: dict[str, Any]) -> None:
    """Put trainer ``settings`` on a trainer that already exists (Axolotl's hook comes after ``__init__``).

    ``accelerator_config`` fields also go on the trainer's accelerator, which read
    them when it was made; the train dataloader is prepared with them later, in ``train()``.
    """
    for key, value in settings.items():
        if key != "accelerator_config":
            setattr(trainer.args, key, value)
            continue
        if not patches.allowed("trainer-dataloader-config"):
            continue
        for name, field_value in value.items():
            setattr(trainer.args.accelerator_config, name, field_value)
            setattr(trainer.accelerator.dataloader_config, name, field_value)


def _plain(cfg: Any) -> dict[str, Any]:
    """A deep copy of the raw config as plain dicts and lists."""
    to_dict = getattr(cfg, "to_dict", None)
    return copy.deepcopy(to_dict() if callable(to_dict) else dict(cfg))
