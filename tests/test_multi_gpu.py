"""Multi-process training (issue 17): rank placement, FSDP storage and fast path, and real 2-process CPU runs.

The slow tests launch ``tests/_ddp_job.py`` with ``accelerate launch --multi_gpu --num_processes 2``
(torch's elastic launcher; on a machine without CUDA the recipe sets ``use_cpu`` and accelerate
forms a gloo group) and compare its per-step losses with one process over the same global batch.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from qlora_plugin import QLoRAConfigError, qlora_recipe

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "tests" / "_ddp_job.py"
AXOLOTL_LOGGER = "axolotl.integrations.qlora_plugin"
LAUNCH_ENV = ("WORLD_SIZE", "LOCAL_RANK", "RANK", "ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_DEEPSPEED")


@pytest.fixture
def no_launch(monkeypatch):
    """A process outside any launch: no launcher variables, no accelerate state left by another test."""
    from accelerate.state import PartialState

    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    saved = dict(PartialState._shared_state)
    PartialState._shared_state.clear()
    yield monkeypatch
    PartialState._shared_state.clear()
    PartialState._shared_state.update(saved)


class Collect(logging.Handler):
    """Keeps the messages it is handed."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


@pytest.fixture
def messages():
    """The package's log messages (INFO and up) during a test."""
    logger = logging.getLogger("qlora_plugin")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.seen
    logger.removeHandler(handler)
    logger.setLevel(level)


def recipe_run(recipe):
    """The recipe's run context outside a trainer: the one a test bound, else one from the launch."""
    from qlora_plugin.build.lora_layers import context_for

    return context_for(recipe)


# -- DDP placement -----------------------------------------------------------------------------


def test_the_launch_is_read_from_the_launchers_environment(no_launch) -> None:
    from qlora_plugin.build.distributed import Launch, current_launch, rank_device_map

    assert current_launch() == Launch(1, 0)
    assert rank_device_map("cuda") is None  # one process: the loader's own default
    no_launch.setenv("WORLD_SIZE", "2")
    no_launch.setenv("LOCAL_RANK", "1")
    assert current_launch() == Launch(2, 1)
    assert rank_device_map("cuda") == {"": 1}
    assert rank_device_map("cpu") is None  # every rank loads on the CPU anyway


def test_sft_config_loads_each_rank_on_its_own_gpu(no_launch) -> None:
    """Under a 2-process launch on CUDA the model given by name goes to this rank's GPU; the user's device_map wins.

    Only "is CUDA here" is pretended (``training_device``), so no process group is needed; the
    real launch is covered by :func:`test_two_cpu_processes_train_like_one_with_the_same_global_batch`.
    """
    from qlora_plugin.build import context
    from qlora_plugin.build.distributed import Launch

    recipe = qlora_recipe(compute_dtype="float32", fast_path=False)
    no_launch.setattr(context, "training_device", lambda: "cuda")  # where the run context asks
    alone = recipe.sft_config(output_dir="out", report_to="none")
    assert "device_map" not in alone.model_init_kwargs
    no_launch.setattr(context, "current_launch", lambda: Launch(2, 1))
    ranked = recipe.sft_config(output_dir="out", report_to="none")
    assert ranked.model_init_kwargs["device_map"] == {"": 1}
    assert ranked.model_init_kwargs["quantization_config"].load_in_4bit
    own = recipe.sft_config(output_dir="out", report_to="none", model_init_kwargs={"device_map": {"": 0}})
    assert own.model_init_kwargs["device_map"] == {"": 0}


def test_deepspeed_is_read_from_the_settings_and_the_launch(no_launch) -> None:
    """Under DeepSpeed the recipe leaves the device_map alone (ZeRO-3 places the parameters; transformers refuses one).

    Only the switch is tested here: transformers needs deepspeed installed to build such a config (not in this venv).
    """
    from qlora_plugin.build.distributed import deepspeed_requested

    assert not deepspeed_requested() and not deepspeed_requested({"fsdp": True})
    assert deepspeed_requested({"deepspeed": "ds_zero3.json"})
    no_launch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert deepspeed_requested()


ZERO3_LAUNCH = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}  # accelerate launch's


def test_the_zero_stage_is_read_from_the_settings_the_launch_and_a_config_file(no_launch, tmp_path) -> None:
    from qlora_plugin.build.distributed import deepspeed_zero_stage, zero3_requested

    assert deepspeed_zero_stage() is None and not zero3_requested()
    assert zero3_requested({"deepspeed": {"zero_optimization": {"stage": 3}}})
    assert deepspeed_zero_stage({"deepspeed": {"zero_optimization": {"stage": 2}}}) == 2
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 3}}))
    assert zero3_requested({"deepspeed": str(config)})  # a path, as TrainingArguments(deepspeed=...) and Axolotl take
    assert deepspeed_zero_stage({"deepspeed": str(tmp_path / "missing.json")}) is None
    no_launch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert not zero3_requested()  # a stage without DeepSpeed on is nobody's launch
    no_launch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert zero3_requested()
    no_launch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    no_launch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))  # a config with deepspeed_config_file
    assert zero3_requested()


def test_under_zero3_the_recipe_shards_like_under_fsdp(no_launch, messages) -> None:
    """4-bit weights in the compute dtype, the fast path off, torch's AdamW: each with one line naming ZeRO-3."""
    import torch

    from qlora_plugin.build.context import make_context
    from qlora_plugin.build.lora_layers import bind_context
    from qlora_plugin.core.environment import FAST_PATH_ON_CPU

    no_launch.setenv(FAST_PATH_ON_CPU, "1")  # the fast path's PyTorch references serve a CPU: it would be on
    no_launch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    no_launch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")  # ZeRO-2 leaves the weights whole: nothing changes
    recipe = qlora_recipe(compute_dtype="bfloat16")
    assert recipe.bnb_config(device="cpu").bnb_4bit_quant_storage == torch.uint8
    run = make_context(recipe)
    assert run.fast_path_on("cpu") and recipe.training_args(device="cpu")["optim"] == "paged_adamw_32bit"
    no_launch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    recipe = qlora_recipe(compute_dtype="bfloat16")
    bind_context(recipe, make_context(recipe))  # one run: each message once
    assert recipe.bnb_config(device="cpu").bnb_4bit_quant_storage == torch.bfloat16
    assert not recipe_run(recipe).fast_path_on("cpu") and not recipe_run(recipe).fast_path_on("cuda")
    assert recipe.training_args(device="cpu")["optim"] == "adamw_torch"
    for words in ("stored as bfloat16", "fast path off", "optim adamw_torch instead of paged_adamw_32bit"):
        said = [m for m in messages if words in m]
        assert len(said) == 1 and "DeepSpeed ZeRO-3" in said[0], (words, messages)


def test_a_zero3_config_in_the_settings_counts_like_the_launch(no_launch) -> None:
    import torch

    from qlora_plugin.build.context import make_context
    from qlora_plugin.build.distributed import zero3_requested
    from qlora_plugin.build.lora_layers import bind_context

    recipe = qlora_recipe(compute_dtype="bfloat16")
    assert recipe_run(recipe).sharding is None
    zero3 = zero3_requested({"deepspeed": {"zero_optimization": {"stage": 3}}})
    bind_context(recipe, make_context(recipe, zero3=zero3))  # as sft_config does
    assert recipe_run(recipe).sharding == "DeepSpeed ZeRO-3"
    assert recipe.bnb_config(device="cpu").bnb_4bit_quant_storage == torch.bfloat16


def test_sft_config_with_a_zero3_config_in_its_settings(no_launch) -> None:
    """``recipe.sft_config(deepspeed=...)``: transformers builds DeepSpeed's config there, so deepspeed must import."""
    import importlib.util

    import torch

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (not a dependency; CI does not install it)")
    recipe = qlora_recipe(compute_dtype="float32")
    zero3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}
    config = recipe.sft_config(output_dir="out", report_to="none", deepspeed=zero3)
    assert config.model_init_kwargs["quantization_config"].bnb_4bit_quant_storage == torch.float32
    assert config.model_init_kwargs["device_map"] is None and config.optim == "adamw_torch"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sft_config_with_deepspeed_in_its_settings_keeps_it_on_a_cpu_launch(no_launch, stage) -> None:
    """On a CPU launch ``use_cpu`` would make accelerate drop DeepSpeed; the config names gloo instead."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (not a dependency; CI does not install it)")
    no_launch.setenv("WORLD_SIZE", "2")
    zero = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto"}
    config = qlora_recipe().sft_config(output_dir="out", report_to="none", deepspeed=zero)
    assert config.ddp_backend == "gloo" and not config.use_cpu


def test_under_zero3_an_explicit_other_storage_is_one_line_naming_the_fix(no_launch) -> None:
    for name, value in ZERO3_LAUNCH.items():
        no_launch.setenv(name, value)
    recipe = qlora_recipe(compute_dtype="bfloat16", quant_storage="uint8")
    with pytest.raises(QLoRAConfigError) as error:
        recipe.bnb_config(device="cpu")
    message = str(error.value)
    assert error.value.field == "quant_storage" and "\n" not in message
    assert "under DeepSpeed ZeRO-3" in message and "quant_storage='auto' or 'bfloat16'" in message


def test_axolotl_keys_under_a_zero3_config(no_launch) -> None:
    from qlora_plugin.build.context import make_context
    from qlora_plugin.integrations.axolotl.expand import native_keys

    recipe = qlora_recipe()
    keys = native_keys(recipe, make_context(recipe, device="cuda", zero3=True))
    quantization = keys["bnb_config_kwargs"]
    assert quantization["bnb_4bit_quant_storage"] == quantization["bnb_4bit_compute_dtype"] != "uint8"
    assert keys["optimizer"] == "adamw_torch"
    plain = native_keys(recipe, make_context(recipe, device="cuda"))
    assert plain["bnb_config_kwargs"]["bnb_4bit_quant_storage"] == "uint8"
    assert plain["optimizer"] == "paged_adamw_32bit"


def test_a_cpu_launch_under_deepspeed_names_gloo_instead_of_use_cpu(no_launch) -> None:
    """With use_cpu accelerate drops DeepSpeed; with no backend named it counts one process (DeepSpeed on a CPU)."""
    from qlora_plugin.integrations.transformers import training_args

    no_launch.setenv("WORLD_SIZE", "2")
    no_launch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    settings = training_args(qlora_recipe(), "cpu")
    assert settings["ddp_backend"] == "gloo" and "use_cpu" not in settings
    assert "ddp_backend" not in training_args(qlora_recipe(), "cuda")


def test_a_cpu_launch_asks_transformers_for_gloo_ddp(no_launch) -> None:
    """Without ``use_cpu`` transformers sets up no DDP on a machine without CUDA: each rank trains alone."""
    from qlora_plugin.integrations.transformers import training_args

    assert "use_cpu" not in training_args(qlora_recipe(), "cpu")
    no_launch.setenv("WORLD_SIZE", "2")
    recipe = qlora_recipe()  # a recipe's run context is made once, at its first use: a new one for the new launch
    assert training_args(recipe, "cpu")["use_cpu"] is True
    assert "use_cpu" not in training_args(recipe, "cuda")


def test_a_16_bit_layer_quantized_in_place_stays_on_its_device() -> None:
    import torch

    from qlora_plugin.build.quantization import quantize_linear

    recipe = qlora_recipe(compute_dtype="float32")
    layer = torch.nn.Linear(64, 32, device="cpu")
    quantized = quantize_linear(layer, recipe, torch.float32)
    assert quantized.weight.device == layer.weight.device
    assert quantized.weight.quant_storage == torch.uint8


def test_a_layer_quantized_in_place_still_computes_once_fsdp_has_swapped_its_weight(no_launch) -> None:
    """FSDP2 hands a 4-bit layer a plain parameter (no quant_state); bitsandbytes restores it from the layer.

    Without the layer knowing its quant_state the forward fails: "quant_state is required".
    """
    import torch

    from qlora_plugin.build.quantization import quantize_linear

    no_launch.setenv("ACCELERATE_USE_FSDP", "true")
    recipe = qlora_recipe(compute_dtype="float32")
    layer = torch.nn.Linear(64, 32, device="cpu")
    quantized = quantize_linear(layer, recipe, torch.float32)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    expected = quantized(x)
    state = quantized.weight.quant_state
    quantized.weight = torch.nn.Parameter(quantized.weight.data.clone(), requires_grad=False)  # as fully_shard does
    assert torch.equal(quantized(x), expected)
    assert quantized.weight.quant_state is state


# -- FSDP --------------------------------------------------------------------------------------

FSDP2 = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}


def test_under_fsdp_the_4bit_weights_are_stored_in_the_compute_dtype(no_launch, messages) -> None:
    import torch

    plain = qlora_recipe(compute_dtype="float32").sft_config(output_dir="out", report_to="none")
    assert plain.model_init_kwargs["quantization_config"].bnb_4bit_quant_storage == torch.uint8

    recipe = qlora_recipe(compute_dtype="bfloat16")
    config = recipe.sft_config(output_dir="out", report_to="none", **FSDP2)
    assert config.model_init_kwargs["quantization_config"].bnb_4bit_quant_storage == torch.bfloat16
    said = [m for m in messages if "quant_storage" in m]
    assert len(said) == 1 and "FSDP" in said[0] and "bfloat16" in said[0]


def test_the_launchs_fsdp_switch_counts_too(no_launch) -> None:
    import torch

    no_launch.setenv("ACCELERATE_USE_FSDP", "true")
    recipe = qlora_recipe(compute_dtype="float32")
    assert recipe.bnb_config(device="cpu").bnb_4bit_quant_storage == torch.float32


@pytest.mark.parametrize("storage", ["uint8", "float16"])
def test_an_explicit_storage_fsdp_cannot_shard_is_one_line_naming_the_fix(no_launch, storage) -> None:
    recipe = qlora_recipe(compute_dtype="bfloat16", quant_storage=storage)
    with pytest.raises(QLoRAConfigError) as error:
        recipe.sft_config(output_dir="out", report_to="none", **FSDP2)
    message = str(error.value)
    assert error.value.field == "quant_storage" and error.value.value == storage
    assert "\n" not in message and "FSDP" in message and "quant_storage='auto' or 'bfloat16'" in message
    # the compute dtype itself is fine
    same = qlora_recipe(compute_dtype="bfloat16", quant_storage="bf16")
    same.sft_config(output_dir="out", report_to="none", **FSDP2)


def test_under_fsdp_the_fast_path_stays_off_with_one_line(no_launch, messages) -> None:
    from qlora_plugin.core.environment import FAST_PATH_ON_CPU

    no_launch.setenv(FAST_PATH_ON_CPU, "1")  # the fast path's PyTorch references serve a CPU: it would be on
    from qlora_plugin.build.context import context_of_args

    recipe = qlora_recipe(compute_dtype="float32")
    assert recipe_run(recipe).fast_path_on("cpu")
    run = context_of_args(recipe.sft_config(output_dir="out", report_to="none", **FSDP2))  # the config's run
    assert not run.fast_path_on("cpu") and not run.fast_path_on("cuda")
    said = [m for m in messages if "fast path off" in m]
    assert len(said) == 1 and "FSDP" in said[0] and "PEFT's forward" in said[0]


@pytest.fixture
def axolotl_load(tiny_model_dir, tmp_path, no_launch):
    """Run Axolotl's load_cfg on a config with the plugin (base keys + ``extra``); return the cfg."""
    pytest.importorskip("axolotl")
    from axolotl.cli.config import load_cfg

    no_launch.setenv("ACCELERATE_USE_FSDP", "false")  # Axolotl sets it for FSDP configs; restored after the test
    no_launch.setenv("FSDP_VERSION", "")
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "say hi", "input": "", "output": "hi"}\n')

    def run(extra: str) -> dict:
        config = {
            "base_model": str(tiny_model_dir),
            "datasets": [{"path": str(data), "type": "alpaca"}],
            "sequence_len": 64,
            "micro_batch_size": 2,
            "num_epochs": 1,
            "output_dir": str(tmp_path / "out"),
            "plugins": ["qlora_plugin.axolotl.QLoRAPlugin"],
            **(yaml.safe_load(textwrap.dedent(extra)) or {}),
        }
        path = tmp_path / "config.yml"
        path.write_text(yaml.safe_dump(config))
        return load_cfg(str(path))

    return run


AXOLOTL_FSDP2 = """
    fsdp_version: 2
    fsdp_config:
      offload_params: false
      cpu_ram_efficient_loading: false  # Axolotl 0.19 refuses it with load_in_4bit under FSDP2
      auto_wrap_policy: TRANSFORMER_BASED_WRAP
      transformer_layer_cls_to_wrap: LlamaDecoderLayer
      state_dict_type: FULL_STATE_DICT
      reshard_after_forward: true
"""


def test_axolotl_fsdp_config_gets_compute_dtype_storage(axolotl_load) -> None:
    plain = axolotl_load("qlora: {compute_dtype: bfloat16}")  # first: Axolotl sets ACCELERATE_USE_FSDP for FSDP
    assert plain.bnb_config_kwargs["bnb_4bit_quant_storage"] == "uint8"
    cfg = axolotl_load("qlora: {compute_dtype: bfloat16}\n" + textwrap.dedent(AXOLOTL_FSDP2))
    assert cfg.bnb_config_kwargs["bnb_4bit_quant_storage"] == "bfloat16"
    assert cfg.bnb_config_kwargs["bnb_4bit_compute_dtype"] == "bfloat16"


def test_axolotl_fsdp_with_uint8_storage_is_an_error_naming_the_section_field(axolotl_load) -> None:
    with pytest.raises(QLoRAConfigError) as error:
        axolotl_load("qlora: {quant_storage: uint8}\n" + textwrap.dedent(AXOLOTL_FSDP2))
    assert error.value.field == "qlora.quant_storage" and "FSDP" in str(error.value)


# -- real 2-process runs (gloo on the CPU) -----------------------------------------------------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def _run(args: list[str], out: Path, *, processes: int = 1, port: int = 29531) -> dict:
    if processes > 1:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), str(JOB), *args,
        ]  # fmt: skip
    else:
        command = [sys.executable, str(JOB), *args]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_two_cpu_processes_train_like_one_with_the_same_global_batch(tiny_model_dir, tmp_path) -> None:
    """2 ranks x batch 4 == 1 process x batch 4 x accumulation 2 (bitwise here), and ~= 1 process x batch 8."""
    two = _run([str(tiny_model_dir), str(tmp_path / "two"), "4"], tmp_path / "two", processes=2)
    accumulated = _run([str(tiny_model_dir), str(tmp_path / "ga"), "4", "2"], tmp_path / "ga")
    doubled = _run([str(tiny_model_dir), str(tmp_path / "b8"), "8"], tmp_path / "b8")

    assert two["world_size"] == 2 and len(two["losses"]) == 4
    assert [rank["launch"] for rank in two["ranks"]] == [[2, 0], [2, 1]]
    assert [rank["cuda_map"] for rank in two["ranks"]] == [{"": 0}, {"": 1}]  # what each rank would load on CUDA
    assert all(rank["devices"] == ["cpu"] for rank in two["ranks"])
    assert two["losses"] == pytest.approx(accumulated["losses"], rel=1e-6, abs=1e-6)
    assert two["losses"] == pytest.approx(doubled["losses"], rel=1e-4, abs=1e-4)
    assert two["losses"][-1] < two["losses"][0]  # it learns
    adapters = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("adapter_model.safetensors"))
    assert adapters == [Path("adapter/adapter_model.safetensors")]  # one adapter, written by rank 0
    assert (tmp_path / "two" / "adapter" / "qlora_recipe.json").is_file()


@pytest.mark.slow
def test_a_16_bit_model_quantized_in_place_trains_on_each_rank(tiny_model_dir, tmp_path) -> None:
    """A model preloaded in float32 is quantized by the recipe on each rank's device and trains under DDP."""
    two = _run([str(tiny_model_dir), str(tmp_path / "two"), "4", "--preloaded"], tmp_path / "two", processes=2)
    assert two["world_size"] == 2 and all(rank["devices"] == ["cpu"] for rank in two["ranks"])
    assert two["quant_storage"] == "torch.uint8" and two["losses"][-1] < two["losses"][0]
    alone = _run([str(tiny_model_dir), str(tmp_path / "ga"), "4", "2", "--preloaded"], tmp_path / "ga")
    assert two["losses"] == pytest.approx(alone["losses"], rel=1e-6, abs=1e-6)


@pytest.mark.slow
def test_fsdp2_shards_the_recipes_4bit_model_on_two_cpu_processes(tiny_model_dir, tmp_path) -> None:
    """torch's fully_shard over gloo (accelerate does FSDP only on GPUs): the recipe's storage choice shards exactly."""
    env = {**_env(), "ACCELERATE_USE_FSDP": "true", "QLORA_FAST_PATH_ON_CPU": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537",
        str(REPO / "tests" / "_fsdp2_job.py"), str(tiny_model_dir), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["storage"] == "torch.float32"  # the compute dtype, picked because the launch says FSDP
    assert result["sharded_4bit_weights"] == 14  # every 4-bit projection of the two layers is a DTensor shard
    assert result["fast_path"] is False  # would be on with QLORA_FAST_PATH_ON_CPU=1 outside FSDP
    assert result["loss"] == result["unsharded_loss"]
    assert result["gradients_compared"] == 28 and result["max_grad_gap"] == 0.0  # LoRA A and B of 14 layers
    assert result["layers_compared"] == 14 and result["bytes_changed"] == 0
    assert result["all_gather_as_bytes"] is True  # the recipe's layers turned FSDP2's byte-exact all-gather on


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fsdp2_shards_a_model_built_straight_into_4_bits(tiny_model_dir, tmp_path, dtype: str) -> None:
    """The 70B run's path on two CPU processes: layers quantized in place by the recipe, then fully_shard.

    The sharded layers must find their quant_state (FSDP replaces the parameter) and compute with
    exactly the packed bytes they had: bf16 storage holds NaN bit patterns that a float copy could alter.
    """
    env = {**_env(), "ACCELERATE_USE_FSDP": "true"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29538",
        str(REPO / "tests" / "_fsdp2_job.py"), str(tiny_model_dir), str(tmp_path), "--built", dtype,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["storage"] == f"torch.{dtype}" and result["sharded_4bit_weights"] == 14
    assert result["layers_compared"] == 14 and result["bytes_changed"] == 0
    assert result["loss"] == result["unsharded_loss"] and result["max_grad_gap"] == 0.0
    assert result["all_gather_as_bytes"] is True


@pytest.mark.slow
@pytest.mark.parametrize("build_in_place", [False, True], ids=["checkpoint", "built-in-place"])
def test_the_multi_gpu_benchmark_runs_its_variants_on_a_cpu(tmp_path, build_in_place: bool) -> None:
    """benchmarks/multigpu.py end to end on the tiny shape (gloo): the GPU call's rows, DDP equal to one rank.

    From a checkpoint all three variants run (accelerate's FSDP falls back to DDP on a CPU, but the
    recipe sees the FSDP launch, and the adapter is saved and checked); built in place, one GPU and DDP.
    """
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "benchmarks" / "multigpu.py"), "tiny", "--out", str(out)]
    command += ["--model-root", str(tmp_path / "models"), "--deadline", "500"]
    command += ["--build-in-place", "--variants", "single-gpu", "ddp-2gpu"] if build_in_place else []
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads((out / "multigpu.json").read_text())
    assert [row["variant"] for row in rows] == ["single-gpu", "ddp-2gpu"] + ([] if build_in_place else ["fsdp2-2gpu"])
    single, ddp = rows[:2]
    assert (single["gpus"], single["grad_accum"], ddp["gpus"], ddp["grad_accum"]) == (1, 2, 2, 1)
    assert len(single["losses"]) == len(ddp["losses"]) == 4 and single["timed_steps"] == 3
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-4)  # the same global batch, the same update
    assert ddp["loss_gap_vs_single_pct"] < 0.01
    for row in rows:
        assert row["tok_s"] > 0 and row["estimate_gib"] > 0 and "error" not in row
        assert row["built_in_place"] is build_in_place and row["versions"]["bitsandbytes"]
        assert ("weights_checked" in row) is row["fsdp"]  # only FSDP copies the weights (hooks cost the fast path)
    if not build_in_place:
        fsdp = rows[2]
        assert fsdp["fsdp"] is True and fsdp["quant_storage"] == "torch.float32" and fsdp["optimizer"] == "adamw_torch"
        assert fsdp["adapter"]["shapes_match"] and fsdp["adapter"]["tensors"] == 28 and fsdp["adapter"]["finite"]
        assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-4)
        assert fsdp["weights_checked"] == [14, 14] and fsdp["weights_changed"] == [0, 0]
    table = (out / "multigpu.md").read_text()
    assert "| tiny | ddp-2gpu | 2 |" in table and "Targets:" in table
    assert "===== tiny-ddp-2gpu" in (out / "variants.log").read_text()


@pytest.mark.slow
def test_the_multi_gpu_benchmark_runs_deepspeed_zero3_on_a_cpu(tmp_path) -> None:
    """The deepspeed-zero3-2gpu variant on the tiny shape: DeepSpeed's CPU accelerator over gloo, beside DDP.

    ZeRO-3 must partition every 4-bit layer (each rank holds half the packed elements), compute with the
    exact packed bytes, train like DDP on the same global batch and save the whole adapter.
    """
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (not a dependency; CI does not install it)")
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "benchmarks" / "multigpu.py"), "tiny", "--out", str(out)]
    command += ["--model-root", str(tmp_path / "models"), "--deadline", "500"]
    command += ["--variants", "ddp-2gpu", "deepspeed-zero3-2gpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ddp, zero3 = json.loads((out / "multigpu.json").read_text())
    assert (zero3["variant"], zero3["sharding"], zero3["gpus"]) == ("deepspeed-zero3-2gpu", "DeepSpeed ZeRO-3", 2)
    assert zero3["quant_storage"] == "torch.float32" and zero3["optimizer"] == "adamw_torch"
    assert zero3["fast_path"] is False and zero3["zero3"] is True and zero3["fsdp"] is False
    assert zero3["layers_4bit"] == 14 and zero3["partitioned_4bit_layers"] == [14, 14]
    assert zero3["persistent_4bit_layers"] == [0, 0]  # the tiny stage sets DeepSpeed's persistence threshold to 0
    assert zero3["local_4bit_fraction"] == [0.5, 0.5]  # each rank holds half of every layer's packed elements
    assert zero3["weights_checked"] == [14, 14] and zero3["weights_changed"] == [0, 0]
    assert zero3["losses"] == pytest.approx(ddp["losses"], rel=1e-5)  # the same global batch and update
    assert zero3["adapter"]["shapes_match"] and zero3["adapter"]["tensors"] == 28 and zero3["adapter"]["finite"]
    assert "4-bit weights partitioned under DeepSpeed ZeRO-3, tiny" in (out / "multigpu.md").read_text()
