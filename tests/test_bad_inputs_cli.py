"""The bad-input corpus through the real ``qlora`` command, one subprocess per input, as a user runs it:
``--set`` values, ``qlora check`` on configs and datasets, ``convert-finlora`` entries, and the
refusals ``merge`` gives before it loads anything. Each exits 2 with one line on stderr naming the
field or file, the value and the fix, and leaves the directory exactly as it was."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from bad_inputs import assert_one_line_error, mount_tmpfs, snapshot, stderr_lines, unmount
from cli_helpers import run_qlora

FINLORA = Path(__file__).parent / "data" / "finlora_finetune_configs.json"
SENTIMENT = "sentiment_llama_3_1_8b_4bits_r4"
PLUGIN = "qlora_plugin.axolotl.QLoRAPlugin"
ROWS = [
    {"instruction": f"Label headline {i}: the cat sat on the mat", "input": "", "output": "positive"} for i in range(9)
]


def rejected(*args, cwd: Path, names: tuple[str, ...], value: str | None) -> str:
    """Run ``qlora ARGS`` in ``cwd``; it must exit 2 with one error line and change nothing there."""
    before = snapshot(cwd)
    result = run_qlora(*args, cwd=cwd)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    errors = [line for line in stderr_lines(result.stderr) if ": error: " in line]
    assert len(errors) == 1, result.stderr
    assert_one_line_error(errors[0], *names, value=value)
    assert snapshot(cwd) == before
    return errors[0]


# -- --set and --preset --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "setting", "field", "value"),
    [
        ("inspect", "learning_rate=.nan", "learning_rate", "nan"),
        ("inspect", "learning_rate=nan", "learning_rate", "nan"),
        ("inspect", "lora_dropout=.inf", "lora_dropout", "inf"),
        ("inspect", "lora_alpha=-.inf", "lora_alpha", "-inf"),
        ("estimate", "max_grad_norm=.inf", "max_grad_norm", "inf"),
        ("estimate", "warmup_ratio=.nan", "warmup_ratio", "nan"),
        ("inspect", "r=16.5", "r", "16.5"),
        ("inspect", "learning_rate=fast", "learning_rate", "'fast'"),
        ("inspect", "target_modules=q_proj,v_proj", "target_modules", "'q_proj,v_proj'"),
        ("inspect", "target_modules=wq", "target_modules", "['wq']"),
        ("inspect", r"target_modules=.*\.wq", "target_modules", r"'.*\\.wq'"),
        ("estimate", "fast_path=maybe", "fast_path", "'maybe'"),
        ("inspect", "r=[1", "r", "'[1'"),
        ("inspect", "rank=4", "rank", "4"),
    ],
)
def test_set_values_are_checked_like_the_section(tiny_model_dir, tmp_path, command, setting, field, value) -> None:
    extra = ["--seq", "64"] if command == "estimate" else []
    rejected(command, tiny_model_dir, *extra, "--set", setting, cwd=tmp_path, names=(field,), value=value)


def test_set_one_target_name_adapts_that_module(tiny_model_dir) -> None:
    result = run_qlora("inspect", tiny_model_dir, "--set", "target_modules=q_proj", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["targets"] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]


# -- qlora check ---------------------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path, tiny_model_dir) -> Path:
    """A working directory with the tiny model, a good dataset and a config that passes `qlora check`."""
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    (tmp_path / "data").mkdir()
    write_rows(tmp_path / "data" / "train.jsonl", ROWS)
    write_config(tmp_path)
    return tmp_path


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def write_config(directory: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    config = {
        "base_model": "./model",
        "plugins": [PLUGIN],
        "qlora": {"r": 8},
        "datasets": [{"path": "./data/train.jsonl", "type": "alpaca"}],
        "sequence_len": 64,
        "output_dir": "./out",
        **changes,
    }
    for key in drop:
        config.pop(key)
    path = directory / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def test_a_good_config_passes_the_check(project) -> None:
    result = run_qlora("check", "config.yml", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "ready to train" in result.stdout and "LoRA on 14 linear layers" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("change", "names", "value"),
    [
        ({"drop": ("plugins",)}, ("plugins", PLUGIN), "None"),
        ({"plugins": ["axolotl.integrations.liger.LigerPlugin"]}, ("plugins", PLUGIN), "LigerPlugin"),
        ({"drop": ("qlora",)}, ("qlora",), "None"),
        ({"qlora": {"r": 0}}, ("qlora.r",), "0"),
        ({"qlora": {"lora_dropout": math.nan}}, ("qlora.lora_dropout",), "nan"),
        ({"qlora": {"target_modules": ["wq", "wv"]}}, ("qlora.target_modules",), "['wq', 'wv']"),
        ({"base_model": "./no-such-model"}, ("base_model",), "'./no-such-model'"),
        (
            {"datasets": [{"path": "./data/missing.jsonl", "type": "alpaca"}]},
            ("datasets[0].path",),
            "'./data/missing.jsonl'",
        ),
        ({"drop": ("datasets",)}, ("datasets",), "None"),
        ({"sequence_len": 4}, ("sequence_len", "train.jsonl"), "4"),
    ],
)
def test_check_names_what_a_config_gets_wrong(project, change, names, value) -> None:
    write_config(project, **change)
    rejected("check", "config.yml", cwd=project, names=names, value=value)


@pytest.mark.parametrize(
    ("content", "names", "value"),
    [
        ("", ("datasets[0].path", "empty file"), "train.jsonl"),
        ("[]", ("datasets[0].path", "empty file"), "train.jsonl"),
        (
            "\n".join(json.dumps(row) for row in ROWS[:4]) + '\n{"instruction": "cut',
            ("train.jsonl line 5",),
            '\'{"instruction": "cut\'',
        ),
        (
            '{"instruction": "a", "output": "b"}\n["not", "an", "object"]\n',
            ("train.jsonl line 2",),
            '\'["not", "an", "object"]\'',
        ),
        (
            "".join(json.dumps({"instruction": r["instruction"], "label": "x"}) + "\n" for r in ROWS),
            ("train.jsonl", "no row has it"),
            "output",
        ),
        (
            "".join(
                json.dumps({k: v for k, v in r.items() if k != "output" or i % 3}) + "\n" for i, r in enumerate(ROWS)
            ),
            ("train.jsonl", "3 of 9 rows", "lines 1, 4, 7"),
            "output",
        ),
        ("".join(json.dumps({**r, "instruction": " "}) + "\n" for r in ROWS), ("train.jsonl",), "instruction"),
    ],
)
def test_check_names_what_a_dataset_gets_wrong(project, content, names, value) -> None:
    (project / "data" / "train.jsonl").write_text(content, encoding="utf-8")
    rejected("check", "config.yml", cwd=project, names=names, value=value)


def test_check_warns_when_some_rows_are_longer_than_sequence_len(project) -> None:
    long = {"instruction": " ".join(["the cat sat on the mat"] * 12), "input": "", "output": "positive"}
    write_rows(project / "data" / "train.jsonl", ROWS[:6] + [long] * 3)
    result = run_qlora("check", "config.yml", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "warning: datasets[0] train.jsonl: 3 of 9 rows checked are longer than sequence_len=64" in result.stdout


def test_check_names_every_problem_of_the_section_at_once(project) -> None:
    write_config(project, qlora={"r": "sixteen", "lora_alpa": 32, "quant_type": "nf4"})
    result = run_qlora("check", "config.yml", cwd=project)
    assert result.returncode == 2, result.stdout
    errors = [line for line in stderr_lines(result.stderr) if ": error: " in line]
    assert len(errors) == 2, result.stderr
    assert_one_line_error(errors[0], "qlora.r", value="'sixteen'")
    assert_one_line_error(errors[1], "qlora.lora_alpa", value="32")
    assert "not a recipe field. Did you mean 'lora_alpha'? Fix: use one of [" in errors[1]
    assert stderr_lines(result.stderr)[-1].endswith("config.yml: 2 problems; fix them, then run `qlora check` again")


def test_check_refuses_what_is_not_a_config(tmp_path) -> None:
    rejected("check", "nowhere.yml", cwd=tmp_path, names=("CONFIG",), value="'nowhere.yml'")
    (tmp_path / "broken.yml").write_text("base_model: ./m\nqlora: {r: 8\nplugins: []\n")
    rejected("check", "broken.yml", cwd=tmp_path, names=("CONFIG", "line"), value="'broken.yml'")


# -- convert-finlora -----------------------------------------------------------------------------------


def entries_with(tmp_path: Path, **changes) -> Path:
    entries = json.loads(FINLORA.read_text())
    entries[SENTIMENT].update(changes)
    path = tmp_path / "configs.json"
    path.write_text(json.dumps(entries))  # NaN is written as the bare token Python's json reads back
    return path


@pytest.mark.parametrize(
    ("changes", "field", "value"),
    [
        ({"learning_rate": math.nan}, f"{SENTIMENT}.learning_rate", "nan"),
        ({"learning_rate": math.inf}, f"{SENTIMENT}.learning_rate", "inf"),
        ({"lora_r": "eight"}, f"{SENTIMENT}.lora_r", "'eight'"),
        ({"lora_dropout": 1.0}, f"{SENTIMENT}.lora_dropout", "1.0"),
        ({"batch_size": 0}, f"{SENTIMENT}.batch_size", "0"),
    ],
)
def test_convert_finlora_checks_each_entry_value(tmp_path, changes, field, value) -> None:
    path = entries_with(tmp_path, **changes)
    rejected("convert-finlora", path.name, SENTIMENT, "--out", "out.yml", cwd=tmp_path, names=(field,), value=value)


def test_convert_finlora_refuses_bad_files_and_options(tmp_path) -> None:
    rejected(
        "convert-finlora", "missing.json", SENTIMENT, cwd=tmp_path, names=("CONFIGS_JSON",), value="'missing.json'"
    )
    (tmp_path / "bad.json").write_text("{not json")
    rejected("convert-finlora", "bad.json", SENTIMENT, cwd=tmp_path, names=("CONFIGS_JSON",), value="'bad.json'")
    shutil.copy(FINLORA, tmp_path / "configs.json")
    rejected(
        "convert-finlora",
        "configs.json",
        SENTIMENT,
        "--out",
        "out.yml",
        "--sequence-len",
        "0",
        cwd=tmp_path,
        names=("--sequence-len",),
        value="0",
    )
    (tmp_path / "a-directory").mkdir()
    rejected(
        "convert-finlora",
        "configs.json",
        SENTIMENT,
        "--out",
        "a-directory",
        cwd=tmp_path,
        names=("--out",),
        value="'a-directory'",
    )


def test_every_config_in_the_repository_loads_the_plugin_and_convert_writes_it(tmp_path) -> None:
    repo = Path(__file__).resolve().parents[1]
    with_section = [
        path
        for folder in ("configs", "examples")
        for path in (repo / folder).rglob("*.y*ml")
        if "qlora" in (yaml.safe_load(path.read_text()) or {})
    ]
    assert with_section
    for path in with_section:
        assert yaml.safe_load(path.read_text())["plugins"] == [PLUGIN], path
    result = run_qlora("check", "configs/qlora.yml", cwd=repo)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    shutil.copy(FINLORA, tmp_path / "configs.json")
    assert run_qlora("convert-finlora", "configs.json", SENTIMENT, "--out", "out.yml", cwd=tmp_path).returncode == 0
    assert yaml.safe_load((tmp_path / "out.yml").read_text())["plugins"] == [PLUGIN]


# -- merge: refused before anything is loaded -------------------------------------------------------------


@pytest.fixture
def adapter(tmp_path, tiny_model_dir) -> Path:
    """An adapter directory as far as the refusals read it: its config and a weights file, with no record of the
    4-bit format."""
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "base_model_name_or_path": str(tiny_model_dir)})
    )
    (directory / "adapter_model.safetensors").write_bytes(b"")  # never read: every refusal comes before loading
    return directory


def recipe_file(directory: Path, **fields) -> None:
    from qlora_plugin.core.fields import DEFAULTS

    (directory / "qlora_recipe.json").write_text(json.dumps({**DEFAULTS, "r": 8, "lora_alpha": 16, **fields}))


def quantization_config(directory: Path, quant_type: str) -> None:
    (directory / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "quantization_config": {
                    "quant_method": "bitsandbytes",
                    "load_in_4bit": True,
                    "bnb_4bit_quant_type": quant_type,
                    "bnb_4bit_use_double_quant": True,
                },
            }
        )
    )


def test_merge_refuses_to_guess_the_format_without_a_record(adapter, tmp_path) -> None:
    line = rejected("merge", "adapter", "--out", "merged", cwd=tmp_path, names=("ADAPTER_DIR",), value="'adapter'")
    assert "--quant-type" in line and "--assume-default-recipe" in line


def test_merge_refuses_records_that_disagree(adapter, tmp_path) -> None:
    recipe_file(adapter, quant_type="nf4")
    quantization_config(adapter, "fp4")
    line = rejected(
        "merge",
        "adapter",
        "--out",
        "merged",
        cwd=tmp_path,
        names=("ADAPTER_DIR", "qlora_recipe.json", "config.json"),
        value="'adapter'",
    )
    assert "says nf4" in line and "says fp4" in line


@pytest.mark.parametrize(
    ("write", "names", "value"),
    [
        (lambda d: recipe_file(d, r=32), ("qlora_recipe.json",), "r=32"),
        (lambda d: recipe_file(d, lora_dropout=math.nan), ("qlora_recipe.json", "lora_dropout"), "nan"),
        (lambda d: (d / "qlora_recipe.json").write_text("{cut"), ("qlora_recipe.json",), None),
        (
            lambda d: (d / "adapter_config.json").write_text(
                json.dumps({"peft_type": "IA3", "base_model_name_or_path": "x"})
            ),
            ("peft_type",),
            "'IA3'",
        ),
        (
            lambda d: (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"})),
            ("base_model_name_or_path", "--base"),
            "None",
        ),
        (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LO'), ("adapter_config.json",), None),
    ],
)
def test_merge_refuses_a_broken_adapter_directory(adapter, tmp_path, write, names, value) -> None:
    write(adapter)
    rejected("merge", "adapter", "--out", "merged", cwd=tmp_path, names=names, value=value)


@pytest.mark.parametrize(
    ("prepare", "out", "value"),
    [
        (lambda d: (d / "a-file").write_text("x"), "a-file/merged", "'a-file/merged'"),
        (lambda d: (d / "a-file").write_text("x"), "a-file", "'a-file'"),
        (lambda d: ((d / "taken").mkdir(), (d / "taken" / "keep.txt").write_text("mine")), "taken", "'taken'"),
        (lambda d: None, ".", "'.'"),
    ],
)
def test_merge_refuses_an_out_it_would_damage(adapter, tmp_path, prepare, out, value) -> None:
    recipe_file(adapter)
    prepare(tmp_path)
    rejected("merge", "adapter", "--out", out, cwd=tmp_path, names=("--out",), value=value)


def test_merge_refuses_a_mount_point_before_merging(adapter, tmp_path) -> None:
    recipe_file(adapter)
    point = tmp_path / "mnt"
    point.mkdir()
    if not mount_tmpfs(point):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        line = rejected("merge", "adapter", "--out", "mnt", cwd=tmp_path, names=("--out",), value="'mnt'")
        assert "mount point" in line and "mnt/merged" in line
    finally:
        unmount(point)
