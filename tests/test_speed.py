"""The recipe's fast-path switch and its first-forward hook, on CPU (the kernels' reference paths)."""

from __future__ import annotations

import pytest
import torch

from qlora_plugin import QLoRAConfigError, qlora_recipe
from qlora_plugin.build.context import make_context
from qlora_plugin.build.trainer_settings import FAST_TRAINER_SETTINGS, fast_trainer_settings
from qlora_plugin.fastpath import activation as speed
from qlora_plugin.fastpath.kernel_choice import kernel_config
from qlora_plugin.fastpath.wording import loss_forward_owner


def config_for(recipe, device, **choices):
    """The kernels a run of ``recipe`` started now (under the environment as it is) asks for on ``device``."""
    return kernel_config(make_context(recipe), device, **choices)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from _tiny_qlora import tiny_llama_checkpoint

    return tiny_llama_checkpoint(tmp_path_factory.mktemp("speed-llama"))


@pytest.fixture(autouse=True)
def no_hook_left_over():
    speed.disarm()
    yield
    speed.disarm()


def _peft(checkpoint, recipe):
    from _tiny_qlora import load_4bit
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_4bit(checkpoint), recipe)
    for name, p in model.named_parameters():  # non-zero B, so the adapters change the output
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    return model


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 384, (2, 24), generator=g)


@pytest.mark.parametrize(("value", "mode"), [(True, "full"), (False, "none"), ("offload", "offload")])
def test_gradient_checkpointing_picks_the_recompute_mode(value, mode):
    recipe = qlora_recipe(gradient_checkpointing=value)
    assert make_context(recipe).recompute == mode
    assert recipe.training_args(device="cpu")["gradient_checkpointing"] is (value is not False)


@pytest.mark.parametrize("value", ["full", 1, None, "Offload"])
def test_other_checkpointing_values_are_clear_errors(value):
    with pytest.raises(QLoRAConfigError) as error:
        qlora_recipe(gradient_checkpointing=value)
    assert error.value.field == "gradient_checkpointing"
    assert "offload" in str(error.value)


def test_cuda_graphs_can_be_switched_off_from_the_environment(monkeypatch):
    recipe = qlora_recipe(gradient_checkpointing=False, lora_dropout=0)
    assert config_for(recipe, "cuda").cuda_graphs is True
    monkeypatch.setenv("QLORA_CUDA_GRAPHS", "0")
    assert config_for(recipe, "cuda").cuda_graphs is False


def test_kernel_config_follows_the_recipe_and_the_host_kernels():
    fast = config_for(qlora_recipe(gradient_checkpointing=False, lora_dropout=0), "cpu", fuse_loss=True)
    assert (fast.recompute, fast.cache_block_constants, fast.fused_loss, fast.cuda_graphs) == ("none", True, True, True)
    with_dropout = config_for(qlora_recipe(gradient_checkpointing=False), "cuda")
    assert with_dropout.cuda_graphs is True  # the default dropout 0.05 is captured too
    low = config_for(qlora_recipe(gradient_checkpointing="offload"), "cuda")
    assert (low.recompute, low.cache_block_constants, low.fused_loss, low.cuda_graphs) == (
        "offload",
        False,
        False,
        False,
    )
    shared = config_for(
        qlora_recipe(gradient_checkpointing=False, lora_dropout=0), "cuda", host_kernels=["lora_o_kernel"]
    )
    assert shared.cuda_graphs is False  # Axolotl's kernels keep some layers: those run eagerly
    assert config_for(qlora_recipe(gradient_checkpointing="offload"), "cpu").recompute == "full"
    hosted = config_for(qlora_recipe(), "cpu", host_kernels=["lora_qkv_kernel", "lora_mlp_kernel"])
    assert set(hosted.skip_lora) == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}
    assert hosted.fused_mlp is False


def test_cpu_runs_are_unchanged(checkpoint):
    """No CUDA: nothing is armed, TRL gets no Liger settings, the trainer keeps its own optimizer."""
    recipe = qlora_recipe()
    model = _peft(checkpoint, recipe)
    assert not speed.is_armed()
    assert not recipe.sft_config(output_dir="unused").use_liger_kernel
    assert recipe.optimizer_cls_and_kwargs() is None
    model.train()
    model(input_ids=_batch(), labels=_batch())
    assert not any(hasattr(m, "_qlora_fast_orig_forward") for m in model.modules())


def test_first_training_forward_applies_the_fast_path_once(checkpoint, caplog):
    recipe = qlora_recipe(lora_dropout=0.0, gradient_checkpointing=True)
    model = _peft(checkpoint, recipe)
    x = _batch()
    model.train()
    with torch.no_grad():
        before = model(input_ids=x, labels=x)
    speed.arm()  # what the LoRA layer factory does on a CUDA machine
    model.eval()
    model(input_ids=x)  # an eval forward leaves it armed
    assert speed.is_armed()
    model.train()
    with caplog.at_level("INFO", logger="qlora_plugin"):
        after = model(input_ids=x, labels=x)
    assert not speed.is_armed()
    lora_layers = [m for n, m in model.named_modules() if n.endswith("_proj") and hasattr(m, "lora_A")]
    assert lora_layers and all(hasattr(m, "_qlora_fast_orig_forward") for m in lora_layers)
    # armed by PEFT's layers, the trainer is unknown: its loss and logits stay as the model makes them
    assert after.logits is not None and after.logits.shape == before.logits.shape
    assert abs(after.loss.item() - before.loss.item()) < 0.02 * before.loss.item()
    after.loss.backward()
    assert all(p.grad is not None and p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert "recompute 'full'" in caplog.text and "fused LoRA over nf4 on 14 layers" in caplog.text
    assert "by the plugin's own function" in caplog.text  # one process: the recompute without a graph
    assert "loss from full logits: left to the trainer" in caplog.text


def test_a_trainer_that_reads_only_the_loss_gets_it_without_logits(checkpoint, caplog):
    recipe = qlora_recipe(lora_dropout=0.0)
    model = _peft(checkpoint, recipe.lora_config())
    x = _batch()
    model.train()
    with torch.no_grad():
        before = model(input_ids=x, labels=x).loss
    speed.arm(model, recipe, own_loss=True)  # what the Axolotl plugin does for supervised training
    with caplog.at_level("INFO", logger="qlora_plugin"):
        after = model(input_ids=x, labels=x)
    assert after.logits is None  # the loss came from hidden states
    assert abs(after.loss.item() - before.item()) < 0.02 * before.item()
    assert "loss without logits: the plugin's" in caplog.text


def test_layers_of_the_trainers_own_kernels_are_left_to_them(checkpoint):
    recipe = qlora_recipe(lora_dropout=0.0)
    model = _peft(checkpoint, recipe.lora_config())  # a trainer's own LoraConfig, as Axolotl builds it
    speed.arm(model, recipe, host_kernels=["lora_qkv_kernel", "lora_mlp_kernel"])
    model.train()
    model(input_ids=_batch(), labels=_batch())
    patched = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "_qlora_fast_orig_forward")}
    assert "o_proj" in patched
    assert not patched & {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "mlp"}


def test_fast_path_trainer_settings_are_training_arguments_on_cuda_only():
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert set(FAST_TRAINER_SETTINGS) <= fields
    on_cuda = qlora_recipe().training_args(device="cuda")
    assert on_cuda["logging_nan_inf_filter"] is False
    assert on_cuda["accelerator_config"] == {"non_blocking": True}
    args = TrainingArguments(
        output_dir="unused", report_to="none", **fast_trainer_settings(make_context(qlora_recipe()), "cuda")
    )
    assert args.accelerator_config.non_blocking is True and args.dataloader_pin_memory is True
    assert FAST_TRAINER_SETTINGS["accelerator_config"] == {"non_blocking": True}  # the copy was used, not the original
    assert "logging_nan_inf_filter" not in qlora_recipe().training_args(device="cpu")
    assert "logging_nan_inf_filter" not in qlora_recipe(fast_path=False).training_args(device="cuda")


def test_a_forward_trl_made_logit_free_is_recognised_as_trls(checkpoint):
    """Whichever way this TRL release makes the loss logit-free, the fast path tells it: TRL's fused LM head
    ("trl-fused") or TRL's chunked_nll forward ("trl-chunked"), both of which the fast path replaces; the fused
    head only with SFT's settings (any other temperature, an fp32 head or other fields stay TRL's)."""
    from _tiny_qlora import load_4bit
    from trl.trainer import sft_trainer, utils

    from qlora_plugin.fastpath.kernels.losses import trl_fused_head_fields

    model = load_4bit(checkpoint)
    assert loss_forward_owner(model) is None
    if hasattr(utils, "add_fused_lm_head"):  # TRL 1.15 and later
        utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        assert loss_forward_owner(model) == "trl-fused"
        assert trl_fused_head_fields(model.forward) == {"log_probs", "entropy", "is_top1"}
        for unsupported in ({"temperature": 0.7}, {"cast_lm_head_to_fp32": True}, {"outputs": ("mean_logits",)}):
            other = load_4bit(checkpoint)
            utils.add_fused_lm_head(other, **unsupported)
            assert loss_forward_owner(other) == "trl-fused" and trl_fused_head_fields(other.forward) is None
    else:  # TRL 1.9's chunked_nll
        sft_trainer._patch_chunked_ce_lm_head(model, chunk_size=256)
        assert loss_forward_owner(model) == "trl-chunked"
