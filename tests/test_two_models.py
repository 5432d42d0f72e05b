"""Two models in one process never affect each other: the fast path's choices live on the model they patch."""

from __future__ import annotations

import logging

import pytest
import torch
from _tiny_qlora import VOCAB, load_4bit, tiny_llama_checkpoint

from qlora_plugin import qlora_recipe
from qlora_plugin.fastpath import activation

pytestmark = pytest.mark.usefixtures("fast_path_on_cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_llama_checkpoint(tmp_path_factory.mktemp("two-models") / "llama")


def _model(checkpoint, config):
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_4bit(checkpoint), config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    return model.train()


def _step(model) -> tuple[float, dict[str, torch.Tensor]]:
    batch = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))
    model.zero_grad()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _patched(model) -> set[str]:
    return {
        name
        for name, module in model.named_modules()
        if "_qlora_fast_orig_forward" in module.__dict__ or "_qlora_rope_forward" in module.__dict__
    }


def test_a_model_without_the_fast_path_is_untouched_by_one_trained_before_it(checkpoint) -> None:
    from peft import LoraConfig

    plain_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    alone_loss, alone_grads = _step(_model(checkpoint, plain_config))  # the reference: the plain model on its own

    fast = _model(checkpoint, qlora_recipe(lora_dropout=0.0))
    _step(fast)
    assert _patched(fast) and not activation.is_armed()

    plain = _model(checkpoint, plain_config)
    loss, grads = _step(plain)
    assert not _patched(plain)
    assert loss == alone_loss
    assert grads.keys() == alone_grads.keys() and all(torch.equal(grads[n], alone_grads[n]) for n in grads)


def test_two_fast_path_models_keep_their_own_kernel_choices(checkpoint) -> None:
    from qlora_plugin.fastpath.kernels import FastPathConfig, apply_fast_path

    first = _model(checkpoint, qlora_recipe(lora_dropout=0.0).lora_config())
    second = _model(checkpoint, qlora_recipe(lora_dropout=0.0).lora_config())
    apply_fast_path(first, config=FastPathConfig(recompute="none", cache_block_constants=True))
    apply_fast_path(second, config=FastPathConfig(recompute="full", cache_block_constants=False, triton_dropout=False))

    def options(model):
        return {
            id(m.__dict__["_qlora_layer_options"]): m.__dict__["_qlora_layer_options"]
            for m in model.modules()
            if "_qlora_layer_options" in m.__dict__
        }

    (first_options,), (second_options,) = options(first).values(), options(second).values()  # one per model
    assert first_options.dequant.keywords["cache_block_constants"] is True and first_options.triton_dropout is True
    assert second_options.dequant.keywords["cache_block_constants"] is False
    assert second_options.triton_dropout is False
    checkpointed = [getattr(layer, "gradient_checkpointing", False) for layer in first.base_model.model.model.layers]
    assert not any(checkpointed)
    assert all(layer.gradient_checkpointing for layer in second.base_model.model.model.layers)


def test_two_recipe_models_built_before_either_trains_both_get_the_fast_path(checkpoint) -> None:
    first = _model(checkpoint, qlora_recipe(lora_dropout=0.0))
    second = _model(checkpoint, qlora_recipe(lora_dropout=0.0))
    _step(first)
    assert _patched(first) and activation.is_armed()  # the second is still waited for
    _step(second)
    assert _patched(second) and not activation.is_armed()


def test_rope_is_patched_on_the_models_attention_only(checkpoint) -> None:
    import transformers.models.llama.modeling_llama as llama

    original = llama.apply_rotary_pos_emb
    fast = _model(checkpoint, qlora_recipe(lora_dropout=0.0))
    _step(fast)
    assert llama.apply_rotary_pos_emb is original
    other = load_4bit(checkpoint)
    assert all(
        "forward" not in module.__dict__ for module in other.modules() if type(module).__name__ == "LlamaAttention"
    )


def test_a_host_tools_logger_is_chosen_per_run(caplog) -> None:
    from qlora_plugin.build.context import make_context

    routed, plain = make_context(qlora_recipe(), logger_name="host.tool"), make_context(qlora_recipe())
    logging.getLogger("host.tool").filters.clear()  # Axolotl's logger class, if an earlier test set it, adds one
    with caplog.at_level(logging.INFO):
        routed.say_once(logging.INFO, "to the host")
        plain.say_once(logging.INFO, "to the package")
    by_message = {record.getMessage(): record.name for record in caplog.records}
    assert by_message == {"to the host": "host.tool", "to the package": "qlora_plugin"}
