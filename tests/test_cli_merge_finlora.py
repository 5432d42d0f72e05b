"""``qlora merge`` and ``qlora convert-finlora``, run as a user runs them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import run_qlora

from qlora_plugin.commands.main import main

FINLORA = Path(__file__).parent / "data" / "finlora_finetune_configs.json"
SENTIMENT = "sentiment_llama_3_1_8b_4bits_r4"


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter on the 4-bit tiny Llama with non-zero B, saved as a trainer saves it."""
    from peft import get_peft_model

    from qlora_plugin import qlora_recipe

    recipe = qlora_recipe(model=tiny_model_dir)
    torch.manual_seed(1)
    model = get_peft_model(recipe.load_model(tiny_model_dir), recipe)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    directory = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(directory)
    return directory


def logits(model, tiny_model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tokenizer(["the cat sat on the mat", "rain falls on the roof"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**batch).logits.float()


def test_merged_model_loads_alone_and_matches_the_adapter_on_the_dequantized_base(
    adapter_dir, tiny_model_dir, tmp_path
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    result = run_qlora("merge", adapter_dir, "--out", out, "--dtype", "bf16")
    assert result.returncode == 0, result.stderr
    assert "merge the LoRA weights" in result.stderr  # the progress bar
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16 and getattr(merged.config, "quantization_config", None) is None
    base_logits, expected = adapter_on_dequantized_base(tiny_model_dir, adapter_dir, torch.bfloat16)
    actual = logits(merged, tiny_model_dir)
    _, reference = adapter_on_dequantized_base(tiny_model_dir, adapter_dir, torch.float32)
    # bf16 tolerance: the merged model may stray from the float32 result about as far as the unmerged
    # adapter computed in bf16 does (the merge adds one bf16 rounding of each weight).
    bf16_noise = (expected - reference).abs().mean()
    assert (actual - reference).abs().mean() < 3 * bf16_noise
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))
    assert (base_logits - expected).abs().mean() > 10 * bf16_noise  # the adapter changes the output


def adapter_on_dequantized_base(tiny_model_dir: Path, adapter_dir: Path, dtype: torch.dtype):
    """Logits of the base (4-bit, dequantized to ``dtype``) without and with the adapter, unmerged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_plugin import qlora_recipe

    base = (
        AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, quantization_config=qlora_recipe().bnb_config("cpu"), dtype=dtype
        )
        .dequantize()
        .to(dtype)
    )
    without = logits(base, tiny_model_dir)
    return without, logits(PeftModel.from_pretrained(base, adapter_dir), tiny_model_dir)


def test_merge_refuses_a_non_empty_out_and_replaces_it_with_force(
    adapter_dir, tiny_model_dir, tmp_path, capsys
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(adapter_dir), "--out", str(out)]) == 2
    assert "--out=" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(["merge", str(adapter_dir), "--out", str(out), "--force", "--dtype", "fp32", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dtype"] == "float32" and summary["merged_layers"] == 14
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    _, expected = adapter_on_dequantized_base(tiny_model_dir, adapter_dir, torch.float32)
    actual = logits(AutoModelForCausalLM.from_pretrained(out), tiny_model_dir)
    assert (actual - expected).abs().max() / expected.abs().max() < 1e-4  # float32: the merge itself is exact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary directories left


def test_a_merge_that_fails_midway_leaves_out_untouched(adapter_dir, tmp_path, capsys) -> None:
    broken = tmp_path / "broken-adapter"
    shutil.copytree(adapter_dir, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    fresh, old = tmp_path / "fresh", tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    assert main(["merge", str(broken), "--out", str(fresh)]) == 1
    assert "qlora merge: failed: " in capsys.readouterr().err
    assert main(["merge", str(broken), "--out", str(old), "--force"]) == 1
    assert not fresh.exists()
    assert [p.name for p in old.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken-adapter", "old"]


def test_merge_rejects_what_is_not_an_adapter(tmp_path, tiny_model_dir, capsys) -> None:
    assert main(["merge", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "ADAPTER_DIR=" in capsys.readouterr().err
    assert main(["merge", str(tiny_model_dir), "--out", str(tmp_path / "o")]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_convert_finlora_writes_a_config_axolotl_loads(tiny_model_dir, tmp_path) -> None:
    pytest.importorskip("axolotl")
    from axolotl.cli.config import load_cfg

    out = tmp_path / "configs" / "sentiment.yml"
    result = run_qlora(
        "convert-finlora", FINLORA, SENTIMENT, "--out", out, "--base-model", tiny_model_dir, "--sequence-len", 64
    )
    assert result.returncode == 0, result.stderr
    written = yaml.safe_load(out.read_text())
    assert written["plugins"] == ["qlora_plugin.axolotl.QLoRAPlugin"]
    assert written["qlora"] == {
        "r": 4,
        "learning_rate": 1e-4,
        "num_train_epochs": 4,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 2,
    }
    data = tmp_path / "finlora_sentiment_train.jsonl"
    data.write_text('{"context": "Sentiment of: shares rose. Answer:", "target": "positive"}\n')
    written["datasets"][0]["path"] = str(data)
    written["output_dir"] = str(tmp_path / "out")
    out.write_text(yaml.safe_dump(written))
    cfg = load_cfg(str(out))
    assert (cfg.adapter, cfg.load_in_4bit, cfg.lora_r) == ("qlora", True, 4)
    assert (cfg.learning_rate, cfg.num_epochs, cfg.micro_batch_size, cfg.gradient_accumulation_steps) == (1e-4, 4, 8, 2)


def test_convert_finlora_refuses_to_overwrite_without_force(tmp_path, capsys) -> None:
    out = tmp_path / "sentiment.yml"
    out.write_text("mine\n")
    assert main(["convert-finlora", str(FINLORA), SENTIMENT, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "mine\n"
    assert main(["convert-finlora", str(FINLORA), SENTIMENT, "--out", str(out), "--force"]) == 0
    assert yaml.safe_load(out.read_text())["qlora"]["r"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sentiment.yml"]


def write_entries(tmp_path: Path, **changes) -> Path:
    entries = json.loads(FINLORA.read_text())
    entry = entries[SENTIMENT]
    for key, value in changes.items():
        if value is None:
            del entry[key]
        else:
            entry[key] = value
    path = tmp_path / "configs.json"
    path.write_text(json.dumps(entries))
    return path


@pytest.mark.parametrize(
    ("name", "changes", "expected"),
    [
        (
            "sentiment_llama_3_1_8b_4bit_r4",
            {},
            "is not an entry of the file. Did you mean "
            "'sentiment_llama_3_1_8b_4bits_r4'? Fix: use one of "
            "['headline_llama_3_1_8b_8bits_r8_dora', 'sentiment_llama_3_1_8b_4bits_r4']",
        ),
        (SENTIMENT, {"lora_r": None}, f"{SENTIMENT}.lora_r=None: is missing"),
        (SENTIMENT, {"quant_bits": 3}, "quant_bits=3: is not a bit width FinLoRA uses"),
        (SENTIMENT, {"lora_r": 0}, f"{SENTIMENT}.lora_r=0: is out of range"),
        ("headline_llama_3_1_8b_8bits_r8_dora", {}, "quant_bits=8: is a 8-bit LoRA run, not QLoRA"),
    ],
)
def test_convert_finlora_rejects_malformed_entries(tmp_path, capsys, name, changes, expected) -> None:
    out = tmp_path / "out.yml"
    assert main(["convert-finlora", str(write_entries(tmp_path, **changes)), name, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert expected in error and "Fix:" in error
    assert not out.exists()


def test_an_8bit_entry_converts_as_4bit_when_asked(tmp_path, capsys) -> None:
    out = tmp_path / "headline.yml"
    assert (
        main(
            ["convert-finlora", str(FINLORA), "headline_llama_3_1_8b_8bits_r8_dora", "--out", str(out), "--force-4bit"]
        )
        == 0
    )
    assert "converted as a 4-bit QLoRA run" in capsys.readouterr().out
    assert yaml.safe_load(out.read_text())["qlora"] == {
        "r": 8,
        "learning_rate": 1e-4,
        "num_train_epochs": 4,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "use_dora": True,
    }
