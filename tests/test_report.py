"""The first-step optimizer report: said once per optimizer, and safe beside other global step hooks."""

from __future__ import annotations

import logging

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from qlora_plugin import qlora_recipe


def test_report_survives_another_global_step_hook_and_is_said_once(tiny_model_dir, caplog) -> None:
    from peft import get_peft_model

    recipe = qlora_recipe()
    model = get_peft_model(recipe.load_model(tiny_model_dir), recipe)
    calls = []
    other = register_optimizer_step_pre_hook(lambda *_: calls.append(1))  # e.g. a profiler's or a logger's
    try:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        batch = torch.randint(0, model.config.vocab_size, (2, 8))
        with caplog.at_level(logging.INFO, logger="qlora_plugin"):
            for _ in range(3):
                model(input_ids=batch, labels=batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
    finally:
        other.remove()
    assert len(calls) == 3
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("optimizer:")]
    assert len(said) == 1 and "runs adamw_torch, not the recipe's paged_adamw_32bit" in said[0], said


def test_under_fsdp_torch_adamw_is_reported_as_the_recipes_choice(tiny_model_dir, caplog, monkeypatch) -> None:
    """The recipe itself picks torch's AdamW under FSDP; the report must not blame the user's arguments."""
    from peft import get_peft_model

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    recipe = qlora_recipe()
    model = get_peft_model(recipe.load_model(tiny_model_dir), recipe)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = torch.randint(0, model.config.vocab_size, (2, 8))
    with caplog.at_level(logging.INFO, logger="qlora_plugin"):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    said = [r for r in caplog.records if r.getMessage().startswith("optimizer:")]
    assert len(said) == 1 and said[0].levelno == logging.INFO, [r.getMessage() for r in said]
    assert "adamw_torch, the recipe's choice under FSDP" in said[0].getMessage()
