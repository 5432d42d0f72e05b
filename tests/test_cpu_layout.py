"""bitsandbytes' CPU repacking of 4-bit weights (CPUs with AVX512-BF16) never reaches a plugin model.

On such CPUs bitsandbytes 0.50 repacks a ``Linear4bit``'s weight in place the first time
the layer runs in eval mode without grad; afterwards the layer returns no input gradient
in training and its weight is no longer NF4 data. These tests force that path; they skip
on CPUs without AVX512-BF16, where bitsandbytes never repacks.
"""

from __future__ import annotations

import pytest
import torch
from _tiny_qlora import VOCAB, load_4bit, tiny_llama_checkpoint

bnbf = pytest.importorskip("bitsandbytes.functional")
pytestmark = pytest.mark.skipif(
    not bnbf.has_avx512bf16(), reason="this CPU has no AVX512-BF16: bitsandbytes never repacks 4-bit weights here"
)


@pytest.fixture(scope="module", params=[384, 352], ids=["mlp-384", "mlp-352"])
def checkpoint(request, tmp_path_factory):
    """MLP widths a multiple of 64 (bitsandbytes repacks) and not (its repacking fails on them)."""
    return tiny_llama_checkpoint(tmp_path_factory.mktemp("layout") / "llama", inter=request.param)


def _repacked(model: torch.nn.Module) -> int:
    return sum(
        bool(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False))
        for m in model.modules()
        if type(m).__name__ == "Linear4bit"
    )


def _eval_pass(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch).logits.float()


def _lora_grads(model: torch.nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=batch, labels=batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _peft(model: torch.nn.Module, config) -> torch.nn.Module:
    from peft import get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    return peft_model


def test_without_the_plugin_an_eval_pass_repacks_and_starves_the_gradients(checkpoint) -> None:
    """The control: plain PEFT over bitsandbytes shows the problem on this CPU."""
    from peft import LoraConfig

    model = _peft(load_4bit(checkpoint), LoraConfig(r=8, target_modules="all-linear"))
    batch = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    before = _lora_grads(model, batch)
    if model.config.intermediate_size % 64:
        with pytest.raises(RuntimeError, match="is invalid for input of size"):
            _eval_pass(model, batch)
        return
    _eval_pass(model, batch)
    assert _repacked(model) > 0
    after = _lora_grads(model, batch)
    assert len(after) < len(before) or any(
        not torch.allclose(after[n], before[n], rtol=0.05, atol=1e-6) for n in before
    )


def test_a_recipe_model_keeps_nf4_through_eval_and_trains_the_same_after(checkpoint) -> None:
    from qlora_plugin import qlora_recipe

    recipe = qlora_recipe(lora_dropout=0.0)
    model = _peft(recipe.load_model(checkpoint), recipe)
    batch = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    before = _lora_grads(model, batch)
    model.train()
    with torch.no_grad():
        train_logits = model(input_ids=batch).logits.float()
    eval_logits = _eval_pass(model, batch)
    assert _repacked(model) == 0
    assert torch.allclose(eval_logits, train_logits)
    after = _lora_grads(model, batch)
    assert after.keys() == before.keys()
    for name in before:
        assert torch.allclose(after[name], before[name]), name


def test_a_model_repacked_before_the_recipe_met_it_is_restored(checkpoint) -> None:
    from qlora_plugin import qlora_recipe

    base = load_4bit(checkpoint)
    if base.config.intermediate_size % 64:
        pytest.skip("bitsandbytes cannot repack this MLP width (the control test shows its error)")
    batch = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    _eval_pass(base, batch)
    assert _repacked(base) > 0
    model = _peft(base, qlora_recipe(lora_dropout=0.0))
    assert _repacked(model) == 0
    grads = _lora_grads(model, batch)
    first_layer_a = [n for n in grads if "layers.0." in n and "lora_A" in n]
    assert first_layer_a and all(grads[n].abs().sum() > 0 for n in first_layer_a)
