"""``qlora export --format gguf`` on the default job: SmolLM2-135M-Instruct with the adapter ``make train`` wrote.

The exported file against the adapter on its base, on the README's example texts: logits (f16
and q8_0 against the merged model), the chat prompt and special tokens, greedy answers read back
by transformers and run by llama.cpp itself, and the Ollama template. Runs where the default
job's model (``make prepare-real``) and trained adapter (``make train``, ``outputs/qlora-smollm2``)
exist, as CI's ``.ci/run`` leaves them, and llama-cpp-python is installed; skips elsewhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import REPO, run_qlora
from readme import shown_examples

sys.path.insert(0, str(REPO / "examples"))
BASE = REPO / ".cache/qlora-real/smollm2-135m-instruct"
ADAPTER = REPO / "outputs/qlora-smollm2"
BOUNDS = {"f16": 3e-3, "q8_0": 4e-2}  # max |logit difference| / max |logit| against the merged model (float32)

pytestmark = pytest.mark.skipif(
    not (BASE / "config.json").is_file() or not (ADAPTER / "adapter_model.safetensors").is_file(),
    reason="needs the default job's model and trained adapter (make train)",
)
# The minutes these take (three merges of a 135M model on a CPU) are spent once per CI run: in the environment
# where llama-cpp-python is built (make test), not again in test-newest and test-axolotl-latest.
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test builds it)")


def readme_texts() -> list[str]:
    examples = shown_examples("generate_sentiment.py")
    texts = [arguments[-1] for arguments, _ in examples if "--no-adapter" not in arguments]
    assert len(texts) >= 4, "README shows no generate_sentiment.py examples"
    return texts


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """The adapter exported as the README shows it (CLI, f16 with a Modelfile), and in q8_0."""
    folder = tmp_path_factory.mktemp("smollm2-gguf")
    done = run_qlora(
        "export", ADAPTER, "--base", BASE, "--format", "gguf", "--out", folder / "f16/model.gguf", "--ollama", "--json"
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["merged_layers"], summary["tokenizer"]["pre"]) == (210, "gpt-2")
    assert summary["tensor_types"] == {"F16": 211, "F32": 61}  # 30 layers x 7 and the tied embedding; 61 norms
    from qlora_plugin.tools.gguf_export import export_gguf

    export_gguf(ADAPTER, folder / "q8_0/model.gguf", "q8_0", base=str(BASE), show_progress=False)
    return {"f16": folder / "f16/model.gguf", "q8_0": folder / "q8_0/model.gguf"}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ADAPTER)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[str]:
    import evaluate_sentiment as ev

    return [ev.text_prompt(tokenizer, text) for text in readme_texts()]


@pytest.fixture(scope="module")
def adapter_answers() -> list[str]:
    """What the README's command answers: the adapter on the 4-bit base, greedy."""
    import generate_sentiment

    return generate_sentiment.main(["--base", str(BASE), "--adapter", str(ADAPTER), *readme_texts()])


@pytest.fixture(scope="module")
def merged_logits(tokenizer, prompts) -> list[torch.Tensor]:
    """The adapter on the base dequantized to float32 (what the export merges), unmerged, on each prompt."""
    from peft import PeftModel

    from qlora_plugin.tools.merge import adapter_recipe, load_dequantized_base, read_adapter

    config, _ = read_adapter(ADAPTER)
    recipe, _ = adapter_recipe(ADAPTER, config)
    model = PeftModel.from_pretrained(load_dequantized_base(str(BASE), recipe, torch.float32), ADAPTER).eval()
    with torch.no_grad():
        return [model(**tokenizer(p, return_tensors="pt", add_special_tokens=False)).logits[0] for p in prompts]


def gguf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def llama_cpp(path: Path):
    module = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test builds it)")
    return module.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0)


def relative_error(actual, expected: torch.Tensor) -> float:
    actual = torch.as_tensor(np.asarray(actual), dtype=torch.float32)
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_logits_match_the_merged_adapter(exported, tokenizer, prompts, merged_logits, out_type) -> None:
    model = gguf_model(exported[out_type])
    llm = llama_cpp(exported[out_type]) if out_type == "f16" else None
    for prompt, expected in zip(prompts, merged_logits, strict=True):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            actual = model(torch.tensor([ids])).logits[0]
        error = relative_error(actual, expected)
        print(f"{out_type} transformers: {error:.2e}")  # README figures (-s)
        assert error < BOUNDS[out_type]
        if llm is not None:
            llm.reset()
            llm.eval(ids)
            error = relative_error(llm.scores[: len(ids)], expected)
            print(f"{out_type} llama.cpp: {error:.2e}")
            assert error < BOUNDS[out_type]


def test_the_chat_prompt_and_special_tokens_survive(exported, tokenizer, prompts) -> None:
    from transformers import AutoTokenizer

    path = exported["f16"]
    reloaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert reloaded.chat_template == tokenizer.chat_template
    for text in readme_texts():
        chat = [{"role": "system", "content": "Classify."}, {"role": "user", "content": text}]
        assert reloaded.apply_chat_template(chat, add_generation_prompt=True) == tokenizer.apply_chat_template(
            chat, add_generation_prompt=True
        )
    llm = llama_cpp(path)
    assert (llm.token_eos(), llm.token_bos()) == (tokenizer.eos_token_id, tokenizer.bos_token_id) == (2, 1)
    assert llm.metadata["tokenizer.ggml.add_bos_token"] == "false"
    for prompt in prompts:  # llama.cpp's own tokenizer splits and merges the prompt as transformers does
        assert (
            llm.tokenize(prompt.encode(), add_bos=False, special=True)
            == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        )


def test_greedy_answers_read_back_by_transformers(exported, tokenizer, prompts, adapter_answers) -> None:
    import evaluate_sentiment as ev

    f16 = ev.greedy_replies(gguf_model(exported["f16"]), tokenizer, prompts)
    assert f16 == adapter_answers
    q8 = ev.greedy_replies(gguf_model(exported["q8_0"]), tokenizer, prompts)
    print("q8_0 differs on", [(a, b) for a, b in zip(q8, adapter_answers, strict=True) if a != b])
    assert [ev.first_word(a) for a in q8] == [ev.first_word(a) for a in adapter_answers]


@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_llama_cpp_answers_as_the_adapter_does(exported, tokenizer, prompts, adapter_answers, out_type) -> None:
    """The test that a runtime reads what was written: llama.cpp tokenizes the README's prompts itself and
    answers greedily."""
    import evaluate_sentiment as ev

    llm = llama_cpp(exported[out_type])
    answers = []
    for prompt in prompts:
        done = llm(prompt, max_tokens=4, temperature=0.0, top_k=1)
        answers.append(done["choices"][0]["text"].strip())
    print(out_type, "llama.cpp:", answers, "adapter:", adapter_answers)
    if out_type == "f16":
        assert answers == adapter_answers
    assert [ev.first_word(a) for a in answers] == [ev.first_word(a) for a in adapter_answers]


def test_the_modelfile_prompts_as_the_chat_template_does(exported, tokenizer) -> None:
    from gotemplate import ollama_values, render

    text = (exported["f16"].parent / "Modelfile").read_text()
    assert "FROM ./model.gguf\n" in text and 'PARAMETER stop "<|im_end|>"' in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    for chat in (
        [{"role": "system", "content": "Classify."}, {"role": "user", "content": readme_texts()[0]}],
        [{"role": "user", "content": "What is the capital of France?"}],  # SmolLM2's default system prompt
    ):
        expected = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert render(template, ollama_values(chat)) == expected


def test_inspect_shows_the_exported_file(exported) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qlora_plugin.commands.main", "inspect", str(exported["q8_0"]), "--json"],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["tokenizer"]["special"]["eos"] == {"id": 2, "text": "<|im_end|>"}
    assert report["tensor_types"] == {"F32": 61, "Q8_0": 211} and report["hyper_parameters"]["block_count"] == 30
