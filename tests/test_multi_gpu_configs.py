"""The shipped multi-GPU configs, read by the real accelerate and Axolotl config parsers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FSDP_KEYS = {"fsdp_version", "fsdp_config", "output_dir", "dataset_prepared_path", "qlora"}


def launch_env(config_file: Path) -> tuple[Any, dict[str, str]]:
    """The parsed arguments of ``accelerate launch --config_file config_file train.py``, and each process's env."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "train.py"])
    args, _, _ = _validate_launch_command(args)
    return args, prepare_multi_gpu_env(args)


def test_the_ddp_config_launches_one_process_per_gpu_without_fsdp() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / "accelerate" / "ddp.yaml"))
    assert config.distributed_type.value == "MULTI_GPU" and config.num_processes == 2 and not config.use_cpu
    args, env = launch_env(CONFIGS / "accelerate" / "ddp.yaml")
    assert args.multi_gpu and not args.use_fsdp and not args.cpu  # torch's elastic launcher, one process per GPU
    assert "ACCELERATE_USE_FSDP" not in env


def test_the_fsdp2_config_turns_on_fsdp2_and_the_recipe_sees_it(monkeypatch) -> None:
    import torch
    from accelerate.commands.config.config_args import load_config_from_file

    from qlora_plugin import qlora_recipe

    config = load_config_from_file(str(CONFIGS / "accelerate" / "fsdp2.yaml"))
    assert config.distributed_type.value == "FSDP"
    assert config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    args, env = launch_env(CONFIGS / "accelerate" / "fsdp2.yaml")
    assert args.use_fsdp
    assert (env["ACCELERATE_USE_FSDP"], env["FSDP_VERSION"]) == ("true", "2")
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false" and env["FSDP_RESHARD_AFTER_FORWARD"] == "true"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", env["ACCELERATE_USE_FSDP"])  # as each launched process sees it
    recipe = qlora_recipe(compute_dtype="bfloat16")
    assert recipe.bnb_config(device="cpu").bnb_4bit_quant_storage == torch.bfloat16


def test_the_deepspeed_zero3_config_turns_on_zero3_and_the_recipe_sees_it(monkeypatch) -> None:
    """accelerate's own parsing and environment for ``accelerate launch`` with the file (deepspeed not needed)."""
    import torch
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    from qlora_plugin import qlora_recipe
    from qlora_plugin.build.lora_layers import context_for

    path = CONFIGS / "accelerate" / "deepspeed-zero3.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type.value == "DEEPSPEED" and config.num_processes == 2
    assert config.deepspeed_config["zero_stage"] == 3 and config.mixed_precision == "bf16"
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    assert args.use_deepspeed and not args.use_fsdp and not args.cpu
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)
    assert (env["ACCELERATE_USE_DEEPSPEED"], env["ACCELERATE_DEEPSPEED_ZERO_STAGE"]) == ("true", "3")
    assert (
        env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"
        and env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"
    )
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] == "none"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] == "none"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.setenv(name, env[name])  # as each launched process sees it
    recipe = qlora_recipe(compute_dtype="bfloat16")
    assert context_for(recipe).sharding == "DeepSpeed ZeRO-3"
    assert recipe.bnb_config(device="cpu").bnb_4bit_quant_storage == torch.bfloat16
    assert recipe.training_args(device="cpu")["optim"] == "adamw_torch"


@pytest.mark.parametrize("optimizer", ["paged_adamw_32bit", "paged_adamw_8bit"])
def test_under_fsdp_a_bitsandbytes_optimizer_becomes_torch_adamw_with_one_line(
    monkeypatch, caplog, optimizer: str
) -> None:
    """bitsandbytes' optimizers fail FSDP2's first step on GPUs (no sharding strategy for their op)."""
    import logging

    from qlora_plugin import qlora_recipe
    from qlora_plugin.build.context import make_context
    from qlora_plugin.integrations.axolotl.expand import native_keys

    plain = qlora_recipe(optimizer=optimizer)
    assert plain.training_args(device="cpu")["optim"] == optimizer  # no FSDP
    assert native_keys(plain, make_context(plain, device="cuda"))["optimizer"] == optimizer
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    recipe = qlora_recipe(optimizer=optimizer)
    with caplog.at_level(logging.INFO, logger="qlora_plugin"):
        assert recipe.training_args(device="cpu")["optim"] == "adamw_torch"
        assert recipe.training_args(device="cpu")["optim"] == "adamw_torch"
    said = [r.getMessage() for r in caplog.records if "under FSDP: optim adamw_torch" in r.getMessage()]
    assert len(said) == 1 and optimizer in said[0]
    assert native_keys(recipe, make_context(recipe, device="cuda", fsdp=True))["optimizer"] == "adamw_torch"
    assert qlora_recipe(optimizer="adamw_torch").training_args(device="cpu")["optim"] == "adamw_torch"


def test_the_axolotl_fsdp2_config_is_the_default_job_plus_fsdp_and_passes_axolotls_validation(
    tmp_path, monkeypatch
) -> None:
    pytest.importorskip("axolotl")
    from axolotl.cli.config import load_cfg

    default = yaml.safe_load((CONFIGS / "qlora.yml").read_text(encoding="utf-8"))
    config = yaml.safe_load((CONFIGS / "qlora-fsdp2.yml").read_text(encoding="utf-8"))
    differing = {key for key in default.keys() | config.keys() if default.get(key) != config.get(key)}
    assert differing <= FSDP_KEYS, differing - FSDP_KEYS
    assert {k: v for k, v in config["qlora"].items()} == {
        k: v for k, v in default["qlora"].items() if k != "compute_dtype"
    }

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")  # Axolotl sets it while loading; restored after the test
    monkeypatch.setenv("FSDP_VERSION", "")
    root = Path(__file__).resolve().parents[1]
    config.update(
        base_model=str(root / config["base_model"]),
        datasets=[{**config["datasets"][0], "path": str(root / config["datasets"][0]["path"])}],
        output_dir=str(tmp_path / "out"),
        dataset_prepared_path=str(tmp_path / "prepared"),
    )
    local = tmp_path / "qlora-fsdp2.yml"
    local.write_text(yaml.safe_dump(config), encoding="utf-8")
    cfg = load_cfg(str(local))
    assert str(cfg.fsdp_version) == "2" and cfg.fsdp_config.auto_wrap_policy == "TRANSFORMER_BASED_WRAP"
    assert (cfg.adapter, cfg.load_in_4bit) == ("qlora", True)
    # on this CPU 'auto' compute is bfloat16, and FSDP needs the 4-bit storage to match it
    assert cfg.bnb_config_kwargs["bnb_4bit_quant_storage"] == cfg.bnb_config_kwargs["bnb_4bit_compute_dtype"]
    assert cfg.bnb_config_kwargs["bnb_4bit_quant_storage"] != "uint8"
