"""The logit-free loss with TRL's statistics, and the fast path putting it in place of TRL's chunked loss.

The PyTorch path runs here; the Triton kernel and its autograd function run under Triton's CPU
interpreter in a subprocess (float32: the interpreter has no bf16 arithmetic). A user's own
``SFTConfig`` (TRL's default ``loss_type``, ``chunked_nll``) trains through the fast path with the
plugin's loss, and logs the same loss, token accuracy and entropy TRL's own forward computes.
No speed is measured here (benchmarks/user_paths.py does that on a GPU).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_plugin.fastpath.kernels.loss_stats import IGNORE_INDEX, linear_cross_entropy_stats, row_stats_reference

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def _float64_truth(hidden, weight, targets, denominator):
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double()
    logits = h @ w.t()
    loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum") / denominator
    loss.backward()
    _, entropy, correct = row_stats_reference(logits.detach(), targets)
    return loss.detach(), correct.sum(), entropy.sum(), h.grad


@pytest.mark.parametrize("num_items", [None, 40, "tensor"])
def test_reference_path_matches_float64(num_items):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 11, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen) / 4
    targets = torch.randint(0, 50, (2, 11), generator=gen)
    targets[:, :3] = IGNORE_INDEX
    counted = int((targets != IGNORE_INDEX).sum())
    items = torch.tensor(40) if num_items == "tensor" else num_items
    stats = linear_cross_entropy_stats(hidden, weight, targets, items)
    stats.loss.backward()
    want_loss, want_correct, want_entropy, want_grad = _float64_truth(
        hidden.reshape(-1, 16), weight, targets.reshape(-1), counted if num_items is None else 40
    )
    assert stats.loss.shape == ()
    assert float(stats.loss) == pytest.approx(float(want_loss), rel=1e-5)
    assert float(stats.num_correct_tokens) == float(want_correct)
    assert float(stats.entropy_sum) == pytest.approx(float(want_entropy), rel=1e-5)
    assert int(stats.num_valid_tokens) == counted
    torch.testing.assert_close(hidden.grad.reshape(-1, 16).double(), want_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("trainable_head", [False, True])
def test_per_token_log_probs_match_float64_under_any_token_weighting(trainable_head):
    """What TRL 1.15+ reads per token (log-probability, entropy, top-1 hit), zero on ignored targets, with
    the gradient of an arbitrary per-token weighting (TRL's dft weights by probability)."""
    from qlora_plugin.fastpath.kernels.loss_stats import linear_token_log_probs

    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 11, 16, generator=gen, requires_grad=True)
    weight = (torch.randn(50, 16, generator=gen) / 4).requires_grad_(trainable_head)
    targets = torch.randint(0, 50, (2, 11), generator=gen)
    targets[:, :3] = IGNORE_INDEX
    weights = torch.rand(2, 11, generator=gen)
    got = linear_token_log_probs(hidden, weight, targets)
    (got.log_probs * weights).sum().backward()

    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(trainable_head)
    logits = h @ w.t()
    want = -torch.nn.functional.cross_entropy(
        logits.reshape(-1, 50), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).reshape(2, 11)
    (want * weights.double()).sum().backward()
    _, entropy, correct = row_stats_reference(logits.detach().reshape(-1, 50), targets.reshape(-1))
    ignored = targets == IGNORE_INDEX
    assert got.log_probs.shape == got.entropy.shape == got.is_top1.shape == targets.shape
    assert (got.log_probs[ignored] == 0).all() and (got.entropy[ignored] == 0).all() and not got.is_top1[ignored].any()
    torch.testing.assert_close(got.log_probs.detach().double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.entropy.double(), entropy.reshape(2, 11).double(), rtol=1e-5, atol=1e-6)
    assert torch.equal(got.is_top1, correct.reshape(2, 11).bool())
    torch.testing.assert_close(hidden.grad.double(), h.grad, rtol=1e-4, atol=1e-7)
    if trainable_head:
        torch.testing.assert_close(weight.grad.double(), w.grad, rtol=1e-4, atol=1e-7)


def test_nothing_counted_gives_zero_loss_and_zero_gradients():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    stats = linear_cross_entropy_stats(hidden, weight, torch.full((5,), IGNORE_INDEX))
    stats.loss.backward()
    assert float(stats.loss) == 0.0 and int(stats.num_valid_tokens) == 0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_triton_kernel_and_function_match_the_references_under_the_interpreter():
    pytest.importorskip("triton")
    cases = [[7, 16, 37], [10, 8, 5000], [4, 8, 8193]]  # one block, several blocks, a 1-column tail
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)])}
    result = subprocess.run(
        [sys.executable, str(HERE / "_interpret_loss_stats.py"), *map(json.dumps, cases)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(cases)
    for row in rows:
        assert row["row_correct_equal"] and row["correct_equal"] and row["ignored_rows_zero"], row
        assert row["token_top1_equal"], row
        for key in ("row_loss_err", "row_entropy_err", "row_grad_err", "loss_err", "entropy_err"):
            assert row[key] < 1e-5, (key, row)
        for key in ("token_log_probs_err", "token_entropy_err"):
            assert row[key] < 1e-5, (key, row)
        for key in ("grad_hidden_err", "grad_weight_err", "token_grad_hidden_err"):
            assert row[key] < 1e-5, (key, row)


def _own_config_trainer(model_dir, dataset, out, **config):
    from trl import SFTConfig, SFTTrainer

    from qlora_plugin import qlora_recipe

    recipe = qlora_recipe(compute_dtype="float32", lora_dropout=0.0)
    args = SFTConfig(
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        max_length=32,
        bf16=False,  # a CPU
        **config,
    )
    return SFTTrainer(model=str(model_dir), args=args, train_dataset=dataset, peft_config=recipe)


def _trl_has_fused_lm_head() -> bool:
    from qlora_plugin.integrations.trl import trl_computes_loss_without_logits

    return trl_computes_loss_without_logits()


def _one_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return {key: value for key, value in batch.items() if isinstance(value, torch.Tensor)}


def test_own_sft_config_trains_with_the_plugins_loss_and_trls_metrics(
    tiny_model_dir, memorisable_dataset, tmp_path, fast_path_on_cpu, caplog
):
    """The user's SFTConfig over the recipe: TRL's logit-free forward (1.9-1.14: ``chunked_nll``; 1.15+: its
    fused LM head) is replaced at the first step, and what TRL reads from it (loss, token accuracy, entropy)
    equals what TRL's own forward computes."""
    fused_head = _trl_has_fused_lm_head()
    trainer = _own_config_trainer(tiny_model_dir, memorisable_dataset, tmp_path)
    assert trainer.args.loss_type == ("nll" if fused_head else "chunked_nll")
    causal_lm = trainer.model.get_base_model()
    trl_forward = causal_lm.forward
    batch = _one_batch(trainer)
    if fused_head:
        batch["fused_lm_head"] = True
    trainer.model.train()
    with caplog.at_level(logging.INFO, logger="qlora_plugin"):
        ours = trainer.model(**batch)  # the first training forward puts the fast path on
    assert ("in place of TRL's fused LM head" if fused_head else "in place of TRL's chunked_nll") in caplog.text
    assert causal_lm.forward.__func__ is not getattr(trl_forward, "__func__", trl_forward)
    with torch.no_grad():
        theirs = trl_forward(**batch)
    assert float(ours.loss) == pytest.approx(float(theirs.loss), rel=1e-4)
    if fused_head:
        assert torch.equal(ours.label_mask, theirs.label_mask)
        torch.testing.assert_close(ours.log_probs.detach(), theirs.log_probs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.entropy, theirs.entropy, rtol=1e-4, atol=1e-5)
        assert torch.equal(ours.is_top1.bool(), theirs.is_top1.bool())
        assert ours.log_sum_sq_probs is None and ours.mean_logits is None  # TRL's SFT asks for neither
    else:
        assert ours.logits is None
        assert float(ours.num_correct_tokens) == float(theirs.num_correct_tokens)
        assert float(ours.entropy_sum) == pytest.approx(float(theirs.entropy_sum), rel=1e-4)
        assert int(ours.num_valid_tokens) == int(theirs.num_valid_tokens)

    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    assert all(entry["entropy"] > 0 and 0 <= entry["mean_token_accuracy"] <= 1 for entry in logged)
    assert logged[-1]["loss"] < logged[0]["loss"]


def test_own_sft_config_with_dft_gets_trls_per_token_gradients(
    tiny_model_dir, memorisable_dataset, tmp_path, fast_path_on_cpu
):
    """TRL 1.15+'s ``dft`` loss weights each token's log-probability by its probability: the gradients the
    plugin's per-token forward gives equal those of TRL's own fused LM head."""
    if not _trl_has_fused_lm_head():
        pytest.skip("TRL before 1.15 computes dft from full logits (no fused LM head to replace)")
    trainer = _own_config_trainer(tiny_model_dir, memorisable_dataset, tmp_path, loss_type="dft")
    causal_lm = trainer.model.get_base_model()
    trl_forward = causal_lm.forward
    batch = {**_one_batch(trainer), "fused_lm_head": True}
    trainer.model.train()

    def dft_gradients(forward):
        trainer.model.zero_grad()
        out = forward(**batch)
        loss = -(out.log_probs * out.log_probs.exp().detach()).sum() / out.label_mask.sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        return float(loss), grads

    trainer.model(**batch)  # the first training forward puts the fast path on
    assert causal_lm.forward.__func__ is not getattr(trl_forward, "__func__", trl_forward)
    their_loss, theirs = dft_gradients(trl_forward)
    our_loss, ours = dft_gradients(trainer.model)
    assert our_loss == pytest.approx(their_loss, rel=1e-4)
    assert theirs.keys() == ours.keys() and len(ours) > 0
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-3, atol=1e-6, msg=name)


def test_full_logit_loss_is_named_with_its_fix_at_the_first_step(
    tiny_model_dir, memorisable_dataset, tmp_path, fast_path_on_cpu, caplog
):
    """Before TRL 1.15, loss_type='nll' keeps the model's own forward (TRL reads the logits): one warning naming
    it and the fix. From 1.15 every TRL loss goes through its fused LM head, which the plugin replaces: no
    warning."""
    from qlora_plugin.fastpath.wording import FULL_LOGITS_WARNING

    trainer = _own_config_trainer(tiny_model_dir, memorisable_dataset, tmp_path, loss_type="nll")
    with caplog.at_level(logging.INFO, logger="qlora_plugin"):
        trainer.train()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.getMessage() == FULL_LOGITS_WARNING]
    if _trl_has_fused_lm_head():
        assert warnings == []
        assert "in place of TRL's fused LM head" in caplog.text
        return
    assert len(warnings) == 1
    assert "loss_type" in FULL_LOGITS_WARNING and "use_liger_kernel=True" in FULL_LOGITS_WARNING
    assert "loss from full logits" in caplog.text
