"""The patch registry: outside a tested version range the plugin leaves that part alone, says so once, and trains."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator

import pytest
import torch
from _tiny_qlora import VOCAB, load_4bit, tiny_llama_checkpoint

from qlora_plugin import qlora_recipe
from qlora_plugin.core import patches
from qlora_plugin.fastpath import activation


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_llama_checkpoint(tmp_path_factory.mktemp("patches") / "llama")


@pytest.fixture
def versions(monkeypatch) -> Iterator[dict[str, str | None]]:
    """Installed versions to pretend, by distribution name; the registry's answers are cached, so reset them."""
    real = patches.installed_version
    pretended: dict[str, str | None] = {}
    monkeypatch.setattr(
        patches, "installed_version", lambda package: pretended[package] if package in pretended else real(package)
    )
    monkeypatch.delenv(patches.FORCE_ENV, raising=False)
    patches.allowed.cache_clear()
    yield pretended
    patches.allowed.cache_clear()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "qlora_plugin"]


def test_every_patch_names_a_range_and_a_fallback() -> None:
    from packaging.specifiers import SpecifierSet

    for name, patch in patches.PATCHES.items():
        specifier = SpecifierSet(patch.tested)
        assert any(s.operator in ("<", "<=", "==", "~=") for s in specifier), f"{name}: no upper bound"
        assert patch.target and patch.fallback, name


def test_outside_the_tested_range_a_patch_is_off_with_one_warning(versions, caplog) -> None:
    versions["peft"] = "0.99.0"
    with caplog.at_level(logging.WARNING, logger="qlora_plugin"):
        assert patches.allowed("peft-lora-4bit-forward") is False
        assert patches.allowed("peft-lora-4bit-forward") is False
    (message,) = _warnings(caplog)
    for part in ("peft-lora-4bit-forward", "peft 0.99.0", ">=0.20,<0.22", "PEFT's LoRA forward", patches.FORCE_ENV):
        assert part in message, (part, message)


def test_inside_the_range_a_patch_is_on_silently_and_a_local_build_tag_is_ignored(versions, caplog) -> None:
    versions["torch"] = "2.13.0+cpu"
    versions["peft"] = "0.21.2"
    with caplog.at_level(logging.WARNING, logger="qlora_plugin"):
        assert patches.allowed("torch-varlen-attention") is True
        assert patches.allowed("peft-lora-4bit-forward") is True
    assert _warnings(caplog) == []


@pytest.mark.parametrize("version", ["0.22.0", "0.19.9", "0.22.0rc1"])
def test_both_ends_of_a_range_are_enforced(versions, version) -> None:
    versions["peft"] = version
    assert patches.allowed("peft-lora-layer-factory") is False


def test_a_missing_package_is_outside_every_range(versions, caplog) -> None:
    versions["liger-kernel"] = None
    with caplog.at_level(logging.WARNING, logger="qlora_plugin"):
        assert patches.allowed("liger-autograd-functions") is False
    assert "liger-kernel (not installed)" in _warnings(caplog)[0]


def test_the_environment_switch_allows_an_untested_release_with_a_warning(versions, monkeypatch, caplog) -> None:
    versions["transformers"] = "5.99.0"
    monkeypatch.setenv(patches.FORCE_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="qlora_plugin"):
        assert patches.allowed("transformers-rope-function") is True
    (message,) = _warnings(caplog)
    assert "transformers 5.99.0" in message and "used anyway" in message


def test_a_c_function_declared_otherwise_is_never_returned(versions, caplog) -> None:
    """bitsandbytes' own declaration is compared with what the plugin would pass; a mismatch turns the call off."""
    with caplog.at_level(logging.WARNING, logger="qlora_plugin"):
        function = patches.c_function(
            "bnb-dequantize-c-calls", "cdequantize_blockwise_fp32", [ctypes.c_void_p, ctypes.c_int32]
        )
    assert function is None
    assert any("cdequantize_blockwise_fp32" in m and "direct call is off" in m for m in _warnings(caplog))


def test_a_c_function_is_not_even_looked_up_outside_the_range(versions) -> None:
    versions["bitsandbytes"] = "0.51.0"
    assert patches.c_function("bnb-dequantize-c-calls", "cdequantize_blockwise_fp32", None) is None


def _train_step(model) -> tuple[float, dict[str, torch.Tensor]]:
    batch = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))
    model.zero_grad()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _recipe_model(model):
    from peft import get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(model, qlora_recipe(lora_dropout=0.0))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    return peft_model.train()


def test_an_untested_transformers_keeps_its_own_norms_and_the_same_numbers(
    checkpoint, versions, fast_path_on_cpu, caplog
) -> None:
    """The fast path still fuses LoRA (PEFT and bitsandbytes are in range); norms and RoPE stay transformers'."""
    reference_loss, reference_grads = _train_step(_recipe_model(load_4bit(checkpoint)))
    activation.disarm()
    versions["transformers"] = "5.99.0"
    patches.allowed.cache_clear()  # the reference run above asked already
    with caplog.at_level(logging.INFO, logger="qlora_plugin"):
        model = _recipe_model(load_4bit(checkpoint))
        loss, grads = _train_step(model)
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms and not any("forward" in m.__dict__ for m in norms)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("qlora fast path on:")]
    assert "RMSNorm on 0, SwiGLU on 0, RoPE on 0 modules" in line and "fused LoRA over nf4 on 14 layers" in line
    assert any("transformers-norm-mlp-forward" in m for m in _warnings(caplog))
    assert loss == pytest.approx(reference_loss, rel=1e-5)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)


def test_an_untested_peft_gets_its_own_layers_and_no_fast_path(checkpoint, versions, fast_path_on_cpu, caplog) -> None:
    """Outside PEFT's range the recipe does not build the layers: a 16-bit model keeps 16-bit base layers."""
    from transformers import AutoModelForCausalLM

    versions["peft"] = "0.99.0"
    with caplog.at_level(logging.INFO, logger="qlora_plugin"):
        model = _recipe_model(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32))
        loss, grads = _train_step(model)
    bases = [m.base_layer for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert bases and all(type(b) is torch.nn.Linear for b in bases)
    assert not any(r.getMessage().startswith("qlora fast path on:") for r in caplog.records)
    assert any("peft-lora-layer-factory" in m and "peft 0.99.0" in m for m in _warnings(caplog))
    assert torch.isfinite(torch.tensor(loss)) and any(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n)


# -- process-wide installs --------------------------------------------------------------------------

INSTALLS = {
    "peft-param-wrapper-forward",
    "transformers-trainer-optimizer-choice",
    "transformers-attention-interface",
    "torch-fsdp2-all-gather-bytes",
    "torch-first-forward-hook",
    "torch-experts-check-hook",
    "torch-optimizer-step-hook",
    "torch-experts-load-hook",
    "python-excepthook",
    "python-atexit-checkpoints",
}


def _process_state() -> dict[str, object]:
    """What the installs change, as the process has it now (identities and registrations; exit handlers apart)."""
    import sys

    import torch.nn.modules.module as torch_module
    import torch.optim.optimizer as torch_optimizer
    from peft.tuners.lora.layer import ParamWrapper
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives
    from transformers import AttentionInterface, Trainer
    from transformers.masking_utils import AttentionMaskInterface

    from qlora_plugin.fastpath.kernels.attention import IMPLEMENTATION

    return {
        "trainer": Trainer.__dict__["get_optimizer_cls_and_kwargs"],
        "wrapper forward": ParamWrapper.__dict__["forward"],
        "wrapper merge": ParamWrapper.__dict__["merge"],
        "fsdp": _fsdp_collectives._get_all_gather_input_metadatas,
        "attention": AttentionInterface._global_mapping.get(IMPLEMENTATION),
        "mask": AttentionMaskInterface._global_mapping.get(IMPLEMENTATION),
        "forward hooks": list(torch_module._global_forward_pre_hooks.values()),
        "optimizer hooks": list(torch_optimizer._global_optimizer_pre_hooks.values()),
        "parameter hooks": list(torch_module._global_parameter_registration_hooks.values()),
        "excepthook": sys.excepthook,
    }


def test_every_process_wide_install_goes_through_the_registry_and_is_undone_exactly() -> None:
    """The list of installs, each made by the code that owns it, then every one reverted to what was there."""
    import atexit

    from qlora_plugin.build import fsdp_bytes, moe_experts, moe_loading, notices
    from qlora_plugin.fastpath.kernels import attention
    from qlora_plugin.integrations import checkpoints, exit_summary, moe_check, transformers

    assert set(patches.installs()) == INSTALLS
    activation.disarm()
    patches.revert_all()
    before = _process_state()
    assert transformers.offer_fused_optimizer()
    assert fsdp_bytes.all_gather_as_bytes()
    assert patches.apply(attention.PATCH, attention._registrations)
    activation.arm()
    assert moe_experts.install_wrapper_forward()
    waiting = qlora_recipe()
    moe_check.arm(waiting)
    assert patches.apply(notices.PATCH, lambda _: notices._report_optimizer)
    as_loaded = moe_loading.ExpertsAsLoaded(frozenset(), qlora_recipe(), torch.device("cpu"), None)
    assert patches.apply(moe_loading.LOAD_HOOK_PATCH, lambda _: as_loaded)
    exit_summary.install()
    handlers = atexit._ncallbacks()  # CPython counts slots: an unregistered handler's stays
    assert patches.apply(checkpoints.PATCH, lambda _: checkpoints._remove_unfinished)
    assert atexit._ncallbacks() == handlers + 1
    assert set(patches.applied()) == INSTALLS
    during = _process_state()
    assert all(during[key] != before[key] for key in before), {k: (before[k], during[k]) for k in before}
    assert transformers.offer_fused_optimizer() and patches.applied().count(transformers.PATCH) == 1  # once
    activation.disarm()
    patches.revert_all()
    assert patches.applied() == [] and _process_state() == before


def test_an_install_outside_its_tested_range_is_not_made(versions) -> None:
    from transformers import Trainer

    from qlora_plugin.integrations.transformers import PATCH, offer_fused_optimizer

    patches.revert(PATCH)
    before = Trainer.__dict__["get_optimizer_cls_and_kwargs"]
    versions["transformers"] = "5.99.0"
    assert offer_fused_optimizer() is False and PATCH not in patches.applied()
    assert Trainer.__dict__["get_optimizer_cls_and_kwargs"] is before
    with pytest.raises(ValueError, match="changes no process-wide state"):
        patches.apply("bnb-quant-state", lambda current: current)
