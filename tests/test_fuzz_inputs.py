"""Property-based fuzzing of every entry point (issue 23): each ``qlora`` subcommand and flag, the
``config.json`` a command reads, the ``qlora:`` section with the Axolotl keys the plugin reads,
``qlora_recipe(...)`` and ``sft_config(...)`` keyword arguments, and FinLoRA entries. Whatever the
input, the answer is a result or one line naming the input, the value and the fix, and nothing is
written on failure or outside ``--out`` (:mod:`fuzz_inputs` holds the invariants and the settings).

What the harness found is kept as explicit examples (``@example`` and the test_bad_inputs_* corpus)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from fuzz_inputs import (
    NUMBERS,
    TEXTS,
    VALUES,
    YAML_WORDS,
    check_cli,
    check_raised,
    fuzz_settings,
    run_cli,
)
from hypothesis import example, given
from hypothesis import strategies as st

from qlora_plugin.core.fields import ALIASES, RECIPE_FIELDS

FINLORA = Path(__file__).parent / "data" / "finlora_finetune_configs.json"
PLUGIN = "qlora_plugin.axolotl.QLoRAPlugin"
ROWS = [{"instruction": f"label {i}: the cat sat on the mat", "input": "", "output": "positive"} for i in range(4)]
FIELD_NAMES = st.sampled_from([*RECIPE_FIELDS, *ALIASES, "rank", "alpha_", "qlora", "model"])


@pytest.fixture(scope="module")
def places(tiny_model_dir, eight_layer_config, tmp_path_factory) -> dict[str, Path]:
    """Read-only inputs the commands get: models, an adapter, configs and data files, by role."""
    import torch
    from peft import get_peft_model

    from qlora_plugin import qlora_recipe

    root = tmp_path_factory.mktemp("fuzz-inputs")
    recipe = qlora_recipe(model=tiny_model_dir)
    model = get_peft_model(recipe.load_model(tiny_model_dir), recipe)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    model.save_pretrained(root / "adapter")
    (root / "empty-dir").mkdir()
    (root / "a-file").write_text("not a model")
    (root / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    shutil.copy(FINLORA, root / "finlora.json")
    return {
        "model": tiny_model_dir,
        "config-only": eight_layer_config,
        "adapter": root / "adapter",
        "empty-dir": root / "empty-dir",
        "a-file": root / "a-file",
        "data": root / "data.jsonl",
        "finlora": root / "finlora.json",
        "missing": root / "no-such-thing",
    }


def place(places: dict[str, Path]) -> st.SearchStrategy[str]:
    """A path argument: one of the prepared inputs, a relative or hub-like name, or nonsense."""
    return st.one_of(
        st.sampled_from(sorted(places)).map(lambda key: str(places[key])),
        st.sampled_from(["./nowhere", "org/model", "", ".", "..", "~/x", "a b"]),
    )


@st.composite
def recipe_options(draw: Any) -> list[str]:
    options: list[str] = []
    if draw(st.booleans()):
        options += ["--preset", draw(st.sampled_from(["default", "paper", "finlora-r4", "papr", ""]))]
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.one_of(FIELD_NAMES, st.sampled_from(["", " r", "=x"])))
        options += ["--set", f"{key}={draw(YAML_WORDS)}" if draw(st.integers(0, 9)) else key]
    return options


def maybe(draw: Any, *tokens: str) -> list[str]:
    return list(tokens) if draw(st.booleans()) else []


@st.composite
def number_text(draw: Any) -> str:
    return draw(st.one_of(st.integers(-3, 5000).map(str), st.sampled_from(["x", "1.5", "", "1e3", "99999999999"])))


@st.composite
def quick_command(draw: Any, places: dict[str, Path]) -> list[str]:
    """``presets``, ``inspect`` or ``estimate`` with any of their flags."""
    command = draw(st.sampled_from(["presets", "inspect", "estimate"]))
    if command == "presets":
        return ["presets", *maybe(draw, "--json"), *maybe(draw, draw(st.sampled_from(["--bogus", "x"])))]
    argv = [command, draw(place(places)), *draw(recipe_options())]
    if command == "estimate":
        if draw(st.integers(0, 9)):
            argv += ["--seq", draw(number_text())]
        argv += maybe(draw, "--batch", draw(number_text()))
        for _ in range(draw(st.integers(0, 2))):
            argv += ["--gpu", draw(st.sampled_from(["h100-80gb", "t4-16gb", "h100", "", "nope"]))]
        argv += maybe(draw, "--gpus", draw(number_text()))
        argv += maybe(draw, "--strategy", draw(st.sampled_from(["ddp", "fsdp", "zero3", ""])))
        argv += maybe(draw, "--path", draw(st.sampled_from(["stock", "fast", "slow"])))
        argv += maybe(draw, "--recompute", draw(st.sampled_from(["none", "full", "offload", "some"])))
        for flag in ("fused-loss", "kernels", "tiled-mlp"):
            argv += maybe(draw, f"--{draw(st.sampled_from(['', 'no-']))}{flag}")
        argv += maybe(draw, "--adapter-dtype", draw(st.sampled_from(["float32", "bfloat16", "int8"])))
        argv += maybe(draw, "--cached-constants")
        argv += maybe(draw, "--offload-keep-layers", draw(number_text()))
        argv += maybe(draw, "--keep-mlp-layers", draw(number_text()))
        argv += maybe(draw, "--park-mlp-layers", draw(number_text()))
        argv += maybe(draw, "--host-gib", draw(number_text()))
    return argv + maybe(draw, "--json") + maybe(draw, "--verbose")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["inspect", "{model}", "--set", "preset=paper"], "--preset paper"),  # a field through the wrong door
        (["inspect", "{model}", "--set", "exclude_modules=.*"], "exclude_modules='.*': leaves no layer"),
        (["estimate", "{model}", "--seq", "100000"], "more than the 64 positions"),  # a warning, exit 0
        (["estimate", "{model}", "--seq", "x"], "invalid int value: 'x'. Fix: "),  # argparse's, one line
        (["inspect", "{adapter}", "--set", "r=8"], "is a run"),  # a run's record takes no recipe options
        (["inspect", "{empty-dir}"], "holds no config.json"),
        (["inspect", "{a-file}"], "is a file, not a directory"),
        (["inspect", "org/model"], "HF_HUB_OFFLINE is set"),  # not in the hub cache: the hub is not asked
    ],
)
def test_what_the_harness_found_in_the_quick_subcommands(places, tmp_path, argv, words) -> None:
    argv = [arg.format(**{key: str(value) for key, value in places.items()}) for arg in argv]
    check_cli(argv, tmp_path)
    _, stdout, stderr = run_cli(argv, tmp_path)
    assert words in " ".join((stdout + stderr).split()), stdout + stderr


@fuzz_settings(60)
@given(data=st.data())
def test_every_quick_subcommand_and_flag(places, tmp_path, data) -> None:
    argv = data.draw(quick_command(places))
    with tempfile.TemporaryDirectory(dir=tmp_path) as cwd:
        check_cli(argv, Path(cwd))


# -- config.json of the model a command reads -------------------------------------------------------

SIZE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "tie_word_embeddings",
    "model_type",
    "architectures",
    "rope_theta",
    "n_embd",
    "n_head",
    "n_layer",
)
SMALL_SIZES = st.one_of(st.integers(-2, 96), st.sampled_from([0, 1, 3, 64, 128, 2**20, 10**9]))
CONFIG_VALUES = st.one_of(SMALL_SIZES, SMALL_SIZES.map(str), st.none(), st.booleans(), st.floats(-10, 200), VALUES)


@st.composite
def model_config(draw: Any) -> dict[str, Any]:
    """A small decoder's config.json with a few fields changed, dropped or of the wrong kind."""
    config: dict[str, Any] = {
        "model_type": draw(st.sampled_from(["llama", "mistral", "qwen2", "qwen3", "gpt2", "bert", "nonsense"])),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 100,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    }
    for key in draw(st.lists(st.sampled_from(SIZE_KEYS), max_size=3, unique=True)):
        if draw(st.integers(0, 4)):
            config[key] = draw(CONFIG_VALUES)
        else:
            config.pop(key, None)
    return config


@fuzz_settings(40)
@given(config=model_config(), command=st.sampled_from(["inspect", "estimate", "check"]), seq=st.integers(1, 200))
@example(config={"model_type": "llama", "hidden_size": 64, "num_attention_heads": 0}, command="inspect", seq=8)
@example(config={"model_type": "llama", "hidden_size": 64, "num_attention_heads": 3}, command="estimate", seq=8)
@example(config={"model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_positions": 16}, command="estimate", seq=64)
@example(config={"model_type": "llama", "hidden_size": "64"}, command="check", seq=8)
def test_config_json_fields_of_the_model(tmp_path, config, command, seq) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path) as cwd:
        model = Path(cwd) / "model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(config))
        if command == "check":
            (Path(cwd) / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
            write_config(Path(cwd), {"sequence_len": seq})
            check_cli(["check", "config.yml"], Path(cwd))
        else:
            check_cli([command, "./model", *(["--seq", str(seq)] if command == "estimate" else [])], Path(cwd))


# -- the qlora: section and the Axolotl keys the plugin reads --------------------------------------------

AXOLOTL_KEYS = st.fixed_dictionaries(
    {},
    optional={
        "sequence_len": st.one_of(st.integers(-1, 200), TEXTS, st.none()),
        "seed": st.one_of(st.integers(-1, 10), TEXTS),
        "output_dir": st.one_of(st.just("./out"), TEXTS, st.none(), st.integers()),
        "lora_target_modules": st.one_of(st.lists(TEXTS, max_size=2), TEXTS, st.none()),
        "fsdp_config": st.one_of(st.none(), st.just({"fsdp_version": 2}), VALUES),
        "deepspeed": st.one_of(st.none(), st.just({"zero_optimization": {"stage": 3}}), TEXTS, VALUES),
        "micro_batch_size": st.one_of(st.integers(-1, 4), TEXTS),
        "bf16": st.one_of(st.booleans(), st.just("auto"), TEXTS),
        "resume_from_checkpoint": st.one_of(st.none(), TEXTS),
        "auto_resume_from_checkpoints": st.one_of(st.booleans(), TEXTS),
        "tokenizer_config": st.one_of(st.none(), TEXTS),
    },
)


def write_config(directory: Path, changes: dict[str, Any], raw: str = "") -> None:
    config = {
        "base_model": "./model",
        "plugins": [PLUGIN],
        "qlora": {"r": 8},
        "datasets": [{"path": "./data.jsonl", "type": "alpaca"}],
        "sequence_len": 32,
        "output_dir": "./out",
        **changes,
    }
    (directory / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False) + raw, encoding="utf-8")


@st.composite
def axolotl_config(draw: Any) -> tuple[dict[str, Any], str]:
    """An Axolotl config: a fuzzed section, fuzzed keys around it, sometimes a repeated or misplaced key."""
    section = draw(
        st.one_of(
            st.dictionaries(FIELD_NAMES, st.one_of(VALUES, YAML_WORDS), max_size=4),
            VALUES,
            st.just({"qlora": {"r": 8}}),
        )
    )
    changes: dict[str, Any] = {"qlora": section, **draw(AXOLOTL_KEYS)}
    if draw(st.integers(0, 5)) == 0:
        changes["plugins"] = draw(st.one_of(VALUES, st.just([PLUGIN, PLUGIN])))
    if draw(st.integers(0, 5)) == 0:
        changes["base_model"] = draw(st.one_of(TEXTS, NUMBERS, st.none(), st.just("./data.jsonl")))
    if draw(st.integers(0, 5)) == 0:
        changes["datasets"] = draw(
            st.one_of(VALUES, st.just([{"path": "./data.jsonl", "type": "alpaca", "qlora": {}}]))
        )
    raw = draw(st.sampled_from(["", "", "", "qlora: {r: 4}\n", "base_model: ./model\n"]))
    return changes, raw


@fuzz_settings(50)
@given(case=axolotl_config())
@example(case=({"qlora": {"r": 8}}, "qlora: {r: 4}\n"))  # the section twice: YAML keeps the last one silently
@example(case=({"qlora": {"qlora": {"r": 8}}}, ""))  # nested one level too deep
@example(case=({"datasets": [{"path": "./data.jsonl", "type": "alpaca", "qlora": {"r": 8}}]}, ""))
@example(case=({"qlora": {"r": 8}, "sequence_len": "long"}, ""))  # a wrong type where a number belongs
@example(case=({"qlora": {"compute_dtype": ["bf16"]}}, ""))
def test_the_qlora_section_and_the_axolotl_keys_through_check(places, tmp_path, case) -> None:
    changes, raw = case
    with tempfile.TemporaryDirectory(dir=tmp_path) as cwd:
        directory = Path(cwd)
        shutil.copytree(places["model"], directory / "model")
        shutil.copy(places["data"], directory / "data.jsonl")
        write_config(directory, changes, raw)
        check_cli(["check", "config.yml"], directory)


@fuzz_settings(40)
@given(case=axolotl_config())
@example(case=({"qlora": {"r": 8}}, "qlora: {r: 4}\n"))
@example(case=({"qlora": {"r": 8}, "sequence_len": "long"}, ""))
def test_the_qlora_section_and_the_axolotl_keys_through_the_plugin(places, tmp_path, case) -> None:
    """The plugin's own entry points (register, then the data preflight), as Axolotl calls them."""
    pytest.importorskip("axolotl")
    from axolotl.utils.dict import DictDefault

    from qlora_plugin.axolotl import QLoRAPlugin

    changes, raw = case
    with tempfile.TemporaryDirectory(dir=tmp_path) as cwd:
        directory = Path(cwd)
        shutil.copytree(places["model"], directory / "model")
        shutil.copy(places["data"], directory / "data.jsonl")
        write_config(directory, changes, raw)
        text = (directory / "config.yml").read_text()
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError:
            return  # Axolotl's own YAML reading reports these
        cfg = DictDefault({**loaded, "axolotl_config_path": str(directory / "config.yml")})
        before = os.getcwd()
        os.chdir(directory)
        try:
            plugin = QLoRAPlugin()
            plugin.register(cfg)
            plugin.load_datasets(cfg)
        except Exception as error:  # noqa: BLE001 - the property: only the plugin's one-line error
            check_raised(error)
        finally:
            os.chdir(before)


# -- qlora_recipe(...) and sft_config(...) ------------------------------------------------------------------

SFT_NAMES = st.sampled_from(
    [
        "learning_rate",
        "max_length",
        "packing",
        "seed",
        "num_train_epochs",
        "max_steps",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "gradient_checkpointing",
        "gradient_checkpointing_kwargs",
        "warmup_steps",
        "lr_scheduler_type",
        "optim",
        "bf16",
        "fp16",
        "logging_steps",
        "save_steps",
        "save_strategy",
        "eval_strategy",
        "eval_steps",
        "max_grad_norm",
        "weight_decay",
        "dataset_text_field",
        "completion_only_loss",
        "loss_type",
        "model_init_kwargs",
        "fsdp",
        "deepspeed",
        "report_to",
        "use_cpu",
        "load_best_model_at_end",
        "lr_scheduler_kwargs",
        "optim_args",
        "warmup_ratio",
        "max_seq_length",
        "evaluation_strategy",
        "r",
        "lora_alpha",
        "peft_config",
    ]
)


@fuzz_settings(80)
@given(
    preset=st.one_of(st.sampled_from(["default", "paper", "finlora-r4"]), TEXTS, st.none(), NUMBERS),
    kwargs=st.dictionaries(st.one_of(FIELD_NAMES, TEXTS), st.one_of(VALUES, st.sets(TEXTS, max_size=2)), max_size=4),
)
@example(preset="default", kwargs={"compute_dtype": ["bf16"]})
@example(preset="default", kwargs={"target_modules": {"a": 1}})
def test_qlora_recipe_keyword_arguments(preset, kwargs) -> None:
    from qlora_plugin import QLoRARecipe, qlora_recipe

    kwargs.pop("model", None)  # the model= path is the config.json and PEFT-model tests' subject
    kwargs.pop("preset", None)  # the positional preset, drawn separately
    try:
        recipe = qlora_recipe(preset, **kwargs)
    except Exception as error:  # noqa: BLE001 - the property: only the one-line error
        check_raised(error)
        return
    assert isinstance(recipe, QLoRARecipe)
    assert recipe.replace().recipe_fields() == recipe.recipe_fields()  # a recipe round-trips through its fields


@fuzz_settings(60)
@given(kwargs=st.dictionaries(st.one_of(SFT_NAMES, TEXTS), VALUES, max_size=4))
@example(kwargs={"gradient_checkpointing_kwargs": "use_reentrant"})  # a string where TRL wants a dict
@example(kwargs={"gradient_checkpointing_kwargs": '{"use_reentrant": false}'})
@example(kwargs={"load_best_model_at_end": True, "save_strategy": "epoch", "eval_strategy": "steps"})
@example(kwargs={"lr_scheduler_kwargs": "x"})
def test_sft_config_keyword_arguments(tmp_path, kwargs) -> None:
    from trl import SFTConfig

    from qlora_plugin import qlora_recipe

    with tempfile.TemporaryDirectory(dir=tmp_path) as cwd:
        kwargs = {"output_dir": os.path.join(cwd, "out"), "report_to": "none", **kwargs}
        kwargs["output_dir"] = os.path.join(cwd, "out")
        try:
            config = qlora_recipe().sft_config(**kwargs)
        except Exception as error:  # noqa: BLE001 - the property: only the one-line error
            check_raised(error)
        else:
            assert isinstance(config, SFTConfig)
        assert os.listdir(cwd) == []  # a config, never a file


# -- FinLoRA entries ---------------------------------------------------------------------------------------

ENTRY_KEYS = (
    "base_model",
    "dataset_path",
    "lora_r",
    "quant_bits",
    "learning_rate",
    "num_epochs",
    "batch_size",
    "gradient_accumulation_steps",
    "lora_alpha",
    "lora_dropout",
    "peft_use_dora",
)


@st.composite
def finlora_case(draw: Any) -> tuple[dict[str, Any], str, list[str]]:
    """A configs file with one entry changed, its name, and the command's options."""
    entry: dict[str, Any] = json.loads(FINLORA.read_text())["sentiment_llama_3_1_8b_4bits_r4"]
    for key in draw(st.lists(st.sampled_from(ENTRY_KEYS), max_size=3, unique=True)):
        if draw(st.integers(0, 4)):
            entry[key] = draw(st.one_of(VALUES, NUMBERS, st.sampled_from([4, 8, 16, 3])))
        else:
            entry.pop(key, None)
    name = draw(st.one_of(st.just("sentiment"), TEXTS, st.sampled_from(["a/b", "../up", ".hidden", "x y", "é"])))
    entries = {name: entry, "other": {"base_model": "m"}}
    options = maybe(draw, "--out", draw(st.sampled_from(["out.yml", "sub/out.yml", "", "existing.yml", "."])))
    options += maybe(draw, "--preset", draw(st.sampled_from(["paper", "nope", ""])))
    options += maybe(draw, "--base-model", draw(st.sampled_from(["./m", "", "org/m"])))
    options += maybe(draw, "--dataset-type", draw(st.sampled_from(["alpaca", "", "finlora"])))
    options += maybe(draw, "--sequence-len", draw(number_text()))
    options += maybe(draw, "--force-4bit") + maybe(draw, "--force") + maybe(draw, "--json")
    if draw(st.integers(0, 9)) == 0:
        entries = draw(VALUES)  # not a mapping of entries at all
    return entries, name, options


@fuzz_settings(60)
@given(case=finlora_case())
@example(case=({"a/b": {"base_model": "m", "dataset_path": "d.jsonl", "lora_r": 4, "quant_bits": 4,
                        "learning_rate": 1e-4, "num_epochs": 1, "batch_size": 1,
                        "gradient_accumulation_steps": 1}}, "a/b", []))  # fmt: skip
@example(case=({"x": {"base_model": None, "dataset_path": "", "lora_r": "8", "quant_bits": 4,
                      "learning_rate": 1e-4, "num_epochs": 1, "batch_size": 1,
                      "gradient_accumulation_steps": 1}}, "x", ["--out", "o.yml"]))  # fmt: skip
def test_finlora_entries(tmp_path, case) -> None:
    entries, name, options = case
    with tempfile.TemporaryDirectory(dir=tmp_path) as cwd:
        directory = Path(cwd)
        (directory / "configs.json").write_text(json.dumps(entries))
        (directory / "existing.yml").write_text("keep: me\n")
        out = options[options.index("--out") + 1] if "--out" in options else None
        outs = (directory / out,) if out else (directory / "configs",)
        status, _ = check_cli(["convert-finlora", "configs.json", name, *options], directory, outs)
        if status == 0:
            written = next(p for p in (directory / (out or "configs")).rglob("*.yml")) if not out else directory / out
            config = yaml.safe_load(written.read_text())
            assert all(isinstance(config[key], str) and config[key].strip() for key in ("base_model", "output_dir"))
            assert isinstance(config["datasets"][0]["path"], str) and config["datasets"][0]["path"].strip()
            assert ".." not in Path(config["output_dir"]).parts
            from qlora_plugin.integrations.axolotl.section import spec_from_section

            spec_from_section(config["qlora"])  # what was written reads back as a valid section


# -- merge: every flag, every kind of adapter directory and --out -----------------------------------------


@st.composite
def merge_case(draw: Any, places: dict[str, Path]) -> tuple[str, list[str], str]:
    """(what the adapter directory is, the options, what --out is)."""
    adapter = draw(
        st.sampled_from(
            ["good", "no-weights", "no-config", "broken-config", "broken-record", "other-rank", "missing", "a-file"]
        )
    )
    out = draw(st.sampled_from(["new", "empty", "non-empty", "file", "link", "dangling-link", "nested/new", "."]))
    options = maybe(draw, "--dtype", draw(st.sampled_from(["bf16", "fp16", "fp32", "int8"])))
    options += maybe(draw, "--base", draw(st.sampled_from([str(places["model"]), "./nowhere", str(places["a-file"])])))
    options += maybe(draw, "--force") + maybe(draw, "--json") + maybe(draw, "--assume-default-recipe")
    options += maybe(draw, "--quant-type", draw(st.sampled_from(["nf4", "fp4", "int4"])))
    options += maybe(draw, draw(st.sampled_from(["--double-quant", "--no-double-quant"])))
    return adapter, options, out


def make_adapter(kind: str, places: dict[str, Path], directory: Path) -> Path:
    adapter = directory / "adapter"
    if kind == "missing":
        return adapter
    if kind == "a-file":
        adapter.write_text("x")
        return adapter
    shutil.copytree(places["adapter"], adapter)
    if kind == "no-weights":
        (adapter / "adapter_model.safetensors").unlink()
    elif kind == "no-config":
        (adapter / "adapter_config.json").unlink()
    elif kind == "broken-config":
        (adapter / "adapter_config.json").write_text('{"peft_type": "LO')
    elif kind == "broken-record":
        (adapter / "qlora_recipe.json").write_text("[1, 2]")
    elif kind == "other-rank":
        record = json.loads((adapter / "qlora_recipe.json").read_text())
        (adapter / "qlora_recipe.json").write_text(json.dumps({**record, "r": record["r"] * 2}))
    return adapter


def make_out(kind: str, directory: Path) -> Path:
    out = directory / ("nested/new" if kind == "nested/new" else "merged")
    if kind == ".":
        return directory
    if kind in ("empty", "non-empty", "link"):
        target = directory / "target"
        target.mkdir()
        if kind == "non-empty":
            (target / "keep.txt").write_text("mine")
        if kind == "link":
            os.symlink(target, out)
        else:
            target.rename(out)
    elif kind == "file":
        out.write_text("a file")
    elif kind == "dangling-link":
        os.symlink(directory / "nothing-here", out)
    return out


@pytest.mark.slow
@fuzz_settings(25)
@given(data=st.data())
def test_merge_every_flag_and_kind_of_input(places, tmp_path, data) -> None:
    adapter_kind, options, out_kind = data.draw(merge_case(places))
    with tempfile.TemporaryDirectory(dir=tmp_path) as cwd:
        directory = Path(cwd)
        adapter = make_adapter(adapter_kind, places, directory)
        out = make_out(out_kind, directory)
        outs = (out, Path(os.path.realpath(out))) if out.is_symlink() else (out,)
        status, _ = check_cli(["merge", str(adapter), "--out", str(out), *options], directory, outs)
        if out_kind == "link":
            assert out.is_symlink(), "the link was replaced"
        assert not [p.name for p in directory.iterdir() if p.name.startswith(".")], "debris left beside --out"
        if status == 0:
            assert (Path(os.path.realpath(out)) / "config.json").is_file()


def test_the_harness_catches_what_it_guards_against(tmp_path) -> None:
    """The invariants fail on a traceback, a two-line error and a stray write (a harness that cannot fail
    would prove nothing)."""
    from fuzz_inputs import ERROR_LINE

    assert not ERROR_LINE.match("qlora inspect: error: something went wrong")
    assert not ERROR_LINE.match("qlora inspect: failed: TypeError: x (nothing was written)")
    assert ERROR_LINE.match("qlora inspect: error: r=0: is out of range. Fix: set r to a positive integer")
    status, _, stderr = run_cli(["inspect", str(tmp_path / "nowhere")], tmp_path)
    assert status == 2 and ERROR_LINE.match(stderr.strip())
