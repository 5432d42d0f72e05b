"""The `qlora:` section through Axolotl's real config loading and validation."""

from __future__ import annotations

import logging
import textwrap

import pytest
import yaml

from qlora_plugin import QLoRAConfigError

pytest.importorskip("axolotl")
AXOLOTL_LOGGER = "axolotl.integrations.qlora_plugin"
PLUGIN = "qlora_plugin.axolotl.QLoRAPlugin"
ALL_LINEAR = {
    f"model.layers.{i}.{part}"
    for i in range(2)
    for part in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
}


class Collect(logging.Handler):
    """Keeps the records it is handed."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.seen: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record)


@pytest.fixture
def load(tiny_model_dir, tmp_path):
    """Write a config (base keys + ``extra``), run Axolotl's load_cfg on it, return (cfg, warnings)."""
    from axolotl.cli.config import load_cfg

    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "say hi", "input": "", "output": "hi"}\n')

    def run(extra: str) -> tuple[dict, list[str]]:
        config = {
            "base_model": str(tiny_model_dir),
            "datasets": [{"path": str(data), "type": "alpaca"}],
            "sequence_len": 64,
            "micro_batch_size": 2,
            "num_epochs": 1,
            "output_dir": str(tmp_path / "out"),
            "plugins": [PLUGIN],
            **(yaml.safe_load(textwrap.dedent(extra)) or {}),
        }
        path = tmp_path / "config.yml"
        path.write_text(yaml.safe_dump(config))
        shown = logging.getLogger(AXOLOTL_LOGGER)  # Axolotl's loggers do not propagate to pytest's root handler
        records = Collect(logging.WARNING)
        shown.addHandler(records)
        try:
            cfg = load_cfg(str(path))
        finally:
            shown.removeHandler(records)
        return cfg, [record.getMessage() for record in records.seen]

    return run


def test_an_empty_section_expands_to_the_default_recipe(load) -> None:
    cfg, warnings = load("qlora: {}")
    assert (cfg.adapter, cfg.load_in_4bit, cfg.load_in_8bit) == ("qlora", True, False)
    assert cfg.bnb_config_kwargs == {
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_compute_dtype": "bfloat16",
    }
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.05)
    assert (cfg.optimizer, cfg.max_grad_norm, cfg.gradient_checkpointing) == ("paged_adamw_32bit", 0.3, True)
    assert cfg.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert set(cfg.lora_target_modules) == ALL_LINEAR  # discovered from the config, before any weights load
    assert not cfg.bf16 and not cfg.lora_qkv_kernel  # CPU: no bf16 mixed precision, no Triton kernels
    assert warnings == []


def test_the_paper_preset(load) -> None:
    cfg, _ = load("qlora: {preset: paper}")
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lr_scheduler) == (64, 16, 0.1, "constant")
    assert (cfg.learning_rate, cfg.warmup_ratio) == (2e-4, 0.03)


def test_the_finlora_preset_sets_batch_epochs_and_accumulation(load) -> None:
    cfg, _ = load("qlora: {preset: finlora-r4}")
    assert (cfg.lora_r, cfg.learning_rate, cfg.num_epochs) == (4, 1e-4, 4)
    assert (cfg.micro_batch_size, cfg.gradient_accumulation_steps) == (8, 2)


def test_overrides_on_a_preset(load) -> None:
    cfg, _ = load("qlora: {preset: paper, r: 8, alpha: 16, quant_type: fp4, double_quant: false, use_rslora: true}")
    assert (cfg.lora_r, cfg.lora_alpha, cfg.peft_use_rslora) == (8, 16, True)
    assert cfg.bnb_config_kwargs["bnb_4bit_quant_type"] == "fp4"
    assert cfg.bnb_config_kwargs["bnb_4bit_use_double_quant"] is False


def test_explicit_targets_are_kept(load) -> None:
    cfg, _ = load("qlora: {target_modules: [q_proj, v_proj]}")
    assert sorted(cfg.lora_target_modules) == ["q_proj", "v_proj"]


def test_fast_path_switch_controls_adapter_upcast(load) -> None:
    fast, _ = load("qlora: {}")
    stock, _ = load("qlora: {fast_path: false}")
    assert fast.peft_autocast_adapter_dtype is False and stock.peft_autocast_adapter_dtype is True


@pytest.mark.parametrize(
    ("native", "key", "used"),
    [
        ("load_in_8bit: true", "load_in_8bit", "False"),
        ("adapter: lora", "adapter", "'qlora'"),
        ("optimizer: adamw_torch", "optimizer", "'paged_adamw_32bit'"),
        ("lora_r: 32", "lora_r", "16"),
        ("bnb_config_kwargs: {bnb_4bit_quant_type: fp4}", "bnb_config_kwargs.bnb_4bit_quant_type", "'nf4'"),
        ("lora_target_linear: true", "lora_target_linear", "None"),
        ("warmup_steps: 10", "warmup_steps", "None"),
        ("lora_qkv_kernel: true", "lora_qkv_kernel", "False"),
    ],
)
def test_native_keys_that_contradict_the_section_are_replaced_with_a_warning(load, native, key, used) -> None:
    cfg, warnings = load(f"qlora: {{}}\n{native}\n")
    assert len(warnings) == 1, warnings
    assert f"`{key}:" in warnings[0] and f"replaced by {used}" in warnings[0]
    assert cfg.adapter == "qlora" and cfg.load_in_4bit and not cfg.load_in_8bit


def test_native_lora_targets_that_match_nothing_give_way_to_discovery(load) -> None:
    cfg, warnings = load("qlora: {}\nlora_target_modules: [wq, wv]\n")
    assert set(cfg.lora_target_modules) == ALL_LINEAR
    assert any("`lora_target_modules: ['wq', 'wv']`" in w for w in warnings)


def test_native_keys_that_agree_raise_no_warning(load) -> None:
    _, warnings = load("qlora: {}\nadapter: qlora\nload_in_4bit: true\noptimizer: paged_adamw_32bit\nbf16: auto\n")
    assert warnings == []


@pytest.mark.parametrize(
    ("section", "field", "hint"),
    [
        ("qlora: {quant_typ: nf4}", "qlora.quant_typ", "Did you mean 'quant_type'"),
        ("qlora: {rank: 8}", "qlora.rank", "not a recipe field"),
        ("qlora: {r: eight}", "qlora.r", "integer"),
        ("qlora: {preset: papr}", "qlora.preset", "Did you mean 'paper'"),
        ("qlora: {quant_type: int4}", "qlora.quant_type", "nf4"),
        ("qlora: {lora_dropout: 1.5}", "qlora.lora_dropout", "[0, 1)"),
        ("qlora: [r, 8]", "qlora", "mapping"),
        ("qlora: {target_modules: [wq]}", "qlora.target_modules", "q_proj"),
    ],
)
def test_a_malformed_section_is_rejected_before_any_model_loads(load, section, field, hint) -> None:
    with pytest.raises(QLoRAConfigError) as error:
        load(section)
    assert error.value.field == field and hint in str(error.value)


@pytest.mark.parametrize("device,expected", [("cuda", False), ("cpu", True)])
def test_the_trainer_gets_the_fast_paths_settings_on_cuda_only(monkeypatch, tmp_path, device, expected) -> None:
    from types import SimpleNamespace

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    from transformers import TrainingArguments

    from qlora_plugin import qlora_recipe
    from qlora_plugin.build.context import make_context
    from qlora_plugin.integrations.axolotl.plugin import QLoRAPlugin

    plugin = QLoRAPlugin()
    plugin.recipe = qlora_recipe()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration())
    # what training_device() reads: a patched training_device would stay bound in any
    # module that first imports it during this test
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
    plugin.context = make_context(plugin.recipe)  # as register makes it, on this device
    # an optimizer already made: only the settings change
    trainer = SimpleNamespace(args=args, accelerator=accelerator, optimizer=object())
    plugin.post_trainer_create(None, trainer)
    assert trainer.args.logging_nan_inf_filter is expected
    # the accelerator was made before the hook: the batch's copy setting goes on it too
    assert accelerator.non_blocking is (not expected) and args.accelerator_config.non_blocking is (not expected)
