"""The fused paged AdamW with no extra argument: a Trainer asked for ``paged_adamw_32bit`` over a recipe's model.

The fused optimizer runs on the fast path, which on a CPU only runs when asked
(``QLORA_FAST_PATH_ON_CPU=1``, its PyTorch reference paths); there its step is PyTorch's
foreach AdamW over ordinary tensors, the same update as bitsandbytes' paged AdamW.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

import pytest

from qlora_plugin import qlora_recipe
from qlora_plugin.core.environment import FAST_PATH_ON_CPU
from qlora_plugin.fastpath import activation

pytestmark = pytest.mark.slow
SENTENCES = ["the cat sat on the mat", "a green frog jumps over the pond", "seven blue birds sing", "my brother reads"]


@pytest.fixture
def checkpoint(tiny_model_dir):
    return tiny_model_dir


def _train(checkpoint, tmp_path, peft_config: Any, *, own_config: dict[str, Any] | None = None, **trainer: Any):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    settings = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "max_length": 16,
        "learning_rate": 5e-3,
        "lr_scheduler_type": "constant",
    }
    args = SFTConfig(**settings, bf16=False, **own_config) if own_config else peft_config.sft_config(**settings)
    trainer_object = SFTTrainer(
        model=str(checkpoint),
        args=args,
        train_dataset=Dataset.from_dict({"text": SENTENCES * 4}),
        peft_config=peft_config,
        **trainer,
    )
    trainer_object.train()
    return trainer_object


def _optimizer_type(trainer) -> str:
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return f"{type(inner).__module__}.{type(inner).__name__}"


def _bitsandbytes_paged_adamw(trainer) -> bool:
    """bitsandbytes' paged AdamW 32-bit, whichever class the trainer built it with."""
    from qlora_plugin.build.notices import describe_optimizer

    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return type(inner).__module__.startswith("bitsandbytes") and describe_optimizer(inner) == "paged_adamw_32bit"


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


FUSED = "qlora_plugin.fastpath.kernels.optim.PagedAdamW"


def test_the_readme_snippet_gets_the_fused_paged_adamw(checkpoint, tmp_path, fast_path_on_cpu, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="qlora_plugin"):
        trainer = _train(checkpoint, tmp_path, qlora_recipe(compute_dtype="float32"))
    assert _optimizer_type(trainer) == FUSED
    assert any("optimizer: paged_adamw_32bit, fused" in r.getMessage() for r in caplog.records)


def test_the_users_own_config_with_paged_adamw_gets_it_and_the_same_losses_as_bitsandbytes(
    checkpoint, tmp_path, fast_path_on_cpu
) -> None:
    import bitsandbytes as bnb

    recipe = qlora_recipe(compute_dtype="float32")
    own = {"optim": "paged_adamw_32bit", "seed": 3}
    fused = _train(checkpoint, tmp_path / "fused", recipe, own_config=own)
    activation.disarm()
    stock = _train(
        checkpoint,
        tmp_path / "stock",
        qlora_recipe(compute_dtype="float32"),
        own_config=own,
        optimizer_cls_and_kwargs=(bnb.optim.PagedAdamW32bit, {"lr": 5e-3, "betas": (0.9, 0.999), "eps": 1e-8}),
    )
    assert _optimizer_type(fused) == FUSED and _bitsandbytes_paged_adamw(stock)
    assert _losses(fused) == pytest.approx(_losses(stock), rel=1e-4)
    assert len(_losses(fused)) == 4


def test_the_users_own_config_naming_no_optimizer_gets_the_recipes_with_one_line(
    checkpoint, tmp_path, fast_path_on_cpu, caplog
) -> None:
    """SFTConfig(...) without optim (transformers' default, adamw_torch_fused) beside peft_config=recipe: the
    recipe's paged AdamW (fused), said once; its moments are paged, not held on the GPU beside the model."""
    with caplog.at_level(logging.INFO, logger="qlora_plugin"):
        trainer = _train(checkpoint, tmp_path, qlora_recipe(compute_dtype="float32"), own_config={"seed": 3})
    assert _optimizer_type(trainer) == FUSED
    lines = [r.getMessage() for r in caplog.records if "optim is left at its default" in r.getMessage()]
    assert len(lines) == 1 and "adamw_torch_fused" in lines[0]


def test_other_optimizers_and_other_models_are_left_to_the_trainer(checkpoint, tmp_path, fast_path_on_cpu) -> None:
    from peft import LoraConfig

    recipe = qlora_recipe(compute_dtype="float32")
    torch_adamw = _train(checkpoint, tmp_path / "adamw", recipe, own_config={"optim": "adamw_torch"})
    assert _optimizer_type(torch_adamw) == "torch.optim.adamw.AdamW"
    activation.disarm()
    plain = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    not_ours = _train(
        checkpoint,
        tmp_path / "plain",
        plain,
        own_config={"optim": "paged_adamw_32bit", "model_init_kwargs": {"quantization_config": recipe.bnb_config()}},
    )
    assert _bitsandbytes_paged_adamw(not_ours)


def test_adapters_a_trainer_rounded_to_bf16_are_float32_again_before_the_fused_optimizer_is_built(
    checkpoint, tmp_path, fast_path_on_cpu
) -> None:
    """TRL's trainers cast a 4-bit model's adapters to bf16; on a GPU the fused optimizer's first step
    refused them (Axolotl's DPO, where the fast path never runs the model to cast them back)."""
    import torch
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from qlora_plugin.integrations.transformers import offer_fused_optimizer

    recipe = qlora_recipe(compute_dtype="float32")
    model = get_peft_model(recipe.load_model(checkpoint, device_map={"": "cpu"}), recipe)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.to(torch.bfloat16)  # what TRL 1.9 does for a quantized model
    assert offer_fused_optimizer()
    args = TrainingArguments(output_dir=str(tmp_path), optim="paged_adamw_32bit", use_cpu=True, report_to="none")
    optimizer_class, _ = Trainer.get_optimizer_cls_and_kwargs(args, model)
    assert optimizer_class.__module__.startswith("qlora_plugin")
    assert {p.dtype for p in trainable} == {torch.float32}


def test_off_the_fast_path_the_trainer_builds_what_optim_names(checkpoint, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(FAST_PATH_ON_CPU, raising=False)
    trainer = _train(checkpoint, tmp_path, qlora_recipe(compute_dtype="float32"))
    assert _bitsandbytes_paged_adamw(trainer)


def test_an_untested_transformers_is_not_wrapped() -> None:
    script = """
import logging, sys
from qlora_plugin.core import patches
real = patches.installed_version
patches.installed_version = lambda p: "5.99.0" if p == "transformers" else real(p)
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
from transformers import Trainer
before = Trainer.__dict__["get_optimizer_cls_and_kwargs"]
from qlora_plugin.integrations.transformers import offer_fused_optimizer
print("wrapped" if offer_fused_optimizer() else "not wrapped")
print("same" if Trainer.__dict__["get_optimizer_cls_and_kwargs"] is before else "changed")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-2:] == ["not wrapped", "same"], done.stdout
    assert any("transformers-trainer-optimizer-choice" in line and "5.99.0" in line for line in lines)


@pytest.mark.parametrize("optim", ["paged_adamw_32bit", "paged_adamw_8bit"])
def test_under_fsdp_a_users_bitsandbytes_optimizer_becomes_torch_adamw_with_one_warning(
    checkpoint, tmp_path, monkeypatch, caplog, optim: str
) -> None:
    """bitsandbytes' optimizers cannot step FSDP2's sharded parameters (run 9 on two GPUs); a user's own
    SFTConfig(optim=...) gets torch's AdamW there, as recipe.sft_config() already names it."""
    import torch
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from qlora_plugin.build.context import attach, make_context
    from qlora_plugin.build.distributed import FSDP_ENV
    from qlora_plugin.integrations.transformers import offer_fused_optimizer

    recipe = qlora_recipe(compute_dtype="float32")
    model = get_peft_model(recipe.load_model(checkpoint, device_map={"": "cpu"}), recipe)
    assert offer_fused_optimizer()
    args = TrainingArguments(output_dir=str(tmp_path), optim=optim, use_cpu=True, report_to="none")
    without_fsdp, _ = Trainer.get_optimizer_cls_and_kwargs(args, model)
    assert without_fsdp.__module__.startswith("bitsandbytes")
    monkeypatch.setenv(FSDP_ENV, "true")
    attach(model, make_context(recipe))  # the model in a run under an FSDP launch
    with caplog.at_level(logging.WARNING, logger="qlora_plugin"):
        for _ in range(2):
            optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
            assert optimizer_class is torch.optim.AdamW and kwargs["lr"] == args.learning_rate
    warnings = [r.getMessage() for r in caplog.records if "cannot update sharded parameters" in r.getMessage()]
    assert len(warnings) == 1 and f"optim='{optim}'" in warnings[0] and "adamw_torch" in warnings[0]
    assert args.optim.value == optim  # the user's arguments are left as they were
    plain, _ = Trainer.get_optimizer_cls_and_kwargs(args, torch.nn.Linear(2, 2))  # not a recipe's model
    assert plain.__module__.startswith("bitsandbytes")


def test_axolotls_trainer_gets_float32_adapters_with_the_fused_optimizer(
    checkpoint, tmp_path, fast_path_on_cpu
) -> None:
    """Axolotl's DPO trainer (TRL's) rounds the adapters to bf16, and the plugin hands the trainer its
    optimizer class directly: the fused optimizer's first step refused bf16 weights on a GPU (run 10)."""
    from types import SimpleNamespace

    import torch
    from peft import get_peft_model
    from transformers import TrainingArguments

    pytest.importorskip("axolotl")  # the newest-releases environment has no Axolotl
    from qlora_plugin.build.context import make_context
    from qlora_plugin.integrations.axolotl.plugin import QLoRAPlugin

    plugin = QLoRAPlugin()
    plugin.recipe = qlora_recipe(compute_dtype="float32")
    plugin.context = make_context(plugin.recipe)  # as register makes it from the config
    model = get_peft_model(plugin.recipe.load_model(checkpoint, device_map={"": "cpu"}), plugin.recipe)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.to(torch.bfloat16)  # what TRL 1.9's DPOTrainer does for a quantized model
    args = TrainingArguments(output_dir=str(tmp_path), optim="paged_adamw_32bit", use_cpu=True, report_to="none")
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration())
    trainer = SimpleNamespace(args=args, model=model, optimizer=None, accelerator=accelerator)
    plugin.post_trainer_create(None, trainer)
    optimizer_class, kwargs = trainer.optimizer_cls_and_kwargs
    assert optimizer_class.__module__.startswith("qlora_plugin")
    assert {p.dtype for p in trainable} == {torch.float32}
    optimizer_class([p for p in trainable], **kwargs).step()  # its first step accepts them
