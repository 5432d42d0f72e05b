"""``qlora export --format gguf`` on tiny models: the file read back by transformers and run by llama.cpp.

The in-repo tiny Llama (``examples/assets/tiny-llama``) gets a LoRA adapter with non-zero B; its
export is compared with the adapter on the dequantized 4-bit base. Tiny random models of every
supported family (:mod:`gguf_models`) check llama.cpp's own reading of the tensors and
hyper-parameters, where the layout quirks live (Q/K permutation, Gemma's norm offset, Qwen3's
q/k norms, tied heads, sliding windows, Llama 3.1 RoPE). No mocks: llama.cpp runs through
llama-cpp-python where it is installed (``make test`` builds it), and the tests that need it skip
elsewhere.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_inputs import assert_one_line_error, mount_tmpfs, snapshot, stderr_lines, unmount
from cli_helpers import REPO, run_qlora
from gguf_models import CHATML, GEMMA, LLAMA3, TEXTS, family_model

from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.tools.gguf_export import export_gguf

TINY_LLAMA = REPO / "examples/assets/tiny-llama"
PROMPT_IDS = [1, 105, 187, 853, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130]
# max |logit difference| / max |logit| against the merged model computed in float32 (measured: README)
BOUNDS = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2, "q4_0": 0.2}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A copy of the in-repo tiny Llama (1M parameters, SentencePiece-style BPE) with a chat template."""
    directory = tmp_path_factory.mktemp("tiny-llama") / "base"
    shutil.copytree(TINY_LLAMA, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory) -> Path:
    """A LoRA adapter with non-zero B on the 4-bit tiny Llama, saved with its qlora_recipe.json."""
    from peft import get_peft_model

    from qlora_plugin import qlora_recipe

    recipe = qlora_recipe(model=base_dir)
    torch.manual_seed(1)
    model = get_peft_model(recipe.load_model(base_dir), recipe)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    directory = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def reference(adapter_dir, base_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits on PROMPT_IDS of the base alone and of the adapter on the dequantized base (float32, unmerged)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_plugin import qlora_recipe

    base = (
        AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=qlora_recipe().bnb_config("cpu"), dtype=torch.float32
        )
        .dequantize()
        .to(torch.float32)
        .eval()
    )
    ids = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        without = base(ids).logits[0]
        with_adapter = PeftModel.from_pretrained(base, adapter_dir).eval()(ids).logits[0]
    return without, with_adapter


@pytest.fixture(scope="module")
def exported(adapter_dir, tmp_path_factory) -> dict[str, Path]:
    """The adapter exported in every type, through the Python function."""
    folder = tmp_path_factory.mktemp("gguf")
    files = {}
    for out_type in BOUNDS:
        files[out_type] = folder / f"tiny-{out_type}.gguf"
        summary = export_gguf(adapter_dir, files[out_type], out_type, show_progress=False)
        assert summary["merged_layers"] == 28 and summary["architecture"] == "llama"
    return files


def relative_error(actual: torch.Tensor | np.ndarray, expected: torch.Tensor) -> float:
    actual = torch.as_tensor(np.asarray(actual), dtype=torch.float32)
    return float((actual - expected).abs().max() / expected.abs().max())


def transformers_logits(path: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def llama_cpp(path: Path, n_ctx: int = 128):
    """The GGUF loaded by llama.cpp itself (llama-cpp-python), every position's logits kept."""
    llama_cpp_module = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (make test builds it)"
    )
    return llama_cpp_module.Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, n_threads=2, seed=0
    )


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp(path)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


# -- the exported adapter, read back ------------------------------------------------------------------------


@pytest.mark.parametrize("out_type", list(BOUNDS))
def test_each_type_read_by_transformers_matches_the_merged_adapter(exported, reference, out_type) -> None:
    without, expected = reference
    actual = transformers_logits(exported[out_type], PROMPT_IDS)
    error = relative_error(actual, expected)
    print(f"{out_type}: max |logit difference| {error:.2e} of the largest logit")  # the README's figures (-s)
    assert error < BOUNDS[out_type]
    assert relative_error(without, expected) > 2 * BOUNDS[out_type]  # the adapter changes more than the bound
    if out_type in ("f16", "bf16"):
        assert torch.equal(actual.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_llama_cpp_runs_the_export_as_the_merged_adapter(exported, reference, out_type) -> None:
    _, expected = reference
    actual = llama_cpp_logits(exported[out_type], PROMPT_IDS)
    assert relative_error(actual, expected) < BOUNDS[out_type]
    if out_type == "f16":
        assert np.array_equal(actual.argmax(-1), expected.argmax(-1).numpy())


def test_greedy_generation_in_llama_cpp_equals_the_adapters(exported, adapter_dir, base_dir) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_plugin import qlora_recipe

    base = (
        AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=qlora_recipe().bnb_config("cpu"), dtype=torch.float32
        )
        .dequantize()
        .to(torch.float32)
    )
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    prompt = PROMPT_IDS[:6]
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    llm = llama_cpp(exported["f16"])
    generated = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        generated.append(token)
        if len(generated) == 12:
            break
    assert generated == expected[0, len(prompt) :].tolist()


def test_the_file_holds_the_tokenizer_template_and_llama_cpp_keys(exported, base_dir) -> None:
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    fields = GGUFReader(exported["f16"]).fields
    value = {name: (list(f.contents()) if f.types[0].name == "ARRAY" else f.contents()) for name, f in fields.items()}
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    assert value["general.architecture"] == "llama" and value["tokenizer.ggml.model"] == "llama"
    assert (value["llama.block_count"], value["llama.embedding_length"]) == (4, 128)
    assert (value["llama.attention.head_count"], value["llama.attention.head_count_kv"]) == (4, 4)
    assert (value["llama.context_length"], value["llama.rope.freq_base"]) == (256, 10000.0)
    assert value["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(config["vocab_size"])))
    assert value["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id == 1
    assert value["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id == 2
    assert value["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id == 3
    assert value["tokenizer.ggml.add_bos_token"] is True  # the tokenizer adds <s>
    assert value["tokenizer.chat_template"] == tokenizer.chat_template
    # llama.cpp reads the same: special tokens, BOS added, the tied head (no output tensor)
    llm = llama_cpp(exported["f16"])
    assert (llm.token_bos(), llm.token_eos()) == (1, 2)
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    assert llm.tokenize(b"the shares rose") == tokenizer("the shares rose")["input_ids"]
    assert "output.weight" not in [t.name for t in GGUFReader(exported["f16"]).tensors]


def test_inspect_reads_a_gguf_back(exported) -> None:
    done = run_qlora("inspect", exported["q8_0"], "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["architecture"] == "llama" and report["hyper_parameters"]["block_count"] == 4
    assert report["tensor_types"] == {"F32": 9, "Q8_0": 29}
    assert report["tokenizer"]["special"]["eos"] == {"id": 2, "text": "</s>"}
    assert report["chat_template"].startswith("{% for m in messages %}")
    text = run_qlora("inspect", exported["q8_0"])
    assert text.returncode == 0 and "llama.cpp architecture llama" in text.stdout and "29 Q8_0" in text.stdout


# -- every family, as llama.cpp reads it ------------------------------------------------------------------


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("families")
    return {family: family_model(family, folder / family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_computes_what_transformers_computes_for_each_family(families, tmp_path, family) -> None:
    """A merged model (no adapter) exported in f16: llama.cpp's logits against transformers' in float32, over
    more positions than the sliding window and past Llama 3.1's original context."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / f"{family}.gguf"
    summary = export_gguf(families[family], out, "f16", show_progress=False)
    model = AutoModelForCausalLM.from_pretrained(families[family], dtype=torch.float32, attn_implementation="eager")
    ids = list(range(5, 45))
    with torch.no_grad():
        expected = model.eval()(torch.tensor([ids])).logits[0]
    actual = llama_cpp_logits(out, ids)
    print(f"{family}: {summary['architecture']}, max |logit difference| {relative_error(actual, expected):.1e}")
    assert relative_error(actual, expected) < 1e-2  # a wrong RoPE layout gives about 0.9 here
    assert_same_choices(actual, expected)


def assert_same_choices(actual: np.ndarray, expected: torch.Tensor) -> None:
    """The same top token wherever the reference's top two differ by more than the largest logit difference
    (random tiny models have near-ties, which any rounding may swap)."""
    difference = float((torch.as_tensor(actual) - expected).abs().max())
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * difference
    assert clear.sum() >= len(clear) // 2
    assert np.array_equal(actual.argmax(-1)[clear.numpy()], expected.argmax(-1)[clear].numpy())


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma3"])
def test_llama_cpp_tokenizes_as_transformers(families, tmp_path, family) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / f"{family}.gguf"
    export_gguf(families[family], out, "q8_0", show_progress=False)
    tokenizer = AutoTokenizer.from_pretrained(families[family])
    llm = llama_cpp(out)
    # letters in random order: how words never seen whole split depends on the order of the merges
    rng = random.Random(0)
    jumbled = [" ".join("".join(rng.sample(word, len(word))) for word in text.split()) for text in TEXTS]
    for text in TEXTS + jumbled:
        assert (
            llm.tokenize(text.encode(), add_bos=False, special=True)
            == tokenizer(text, add_special_tokens=False)["input_ids"]
        ), text


def test_transformers_reads_the_tokenizer_and_template_back(families, tmp_path) -> None:
    """transformers' GGUF reader (which rebuilds a byte-level tokenizer from the file) gives the same chat ids."""
    from transformers import AutoTokenizer

    out = tmp_path / "qwen2.gguf"
    export_gguf(families["qwen2"], out, "f16", show_progress=False)
    original = AutoTokenizer.from_pretrained(families["qwen2"])
    reloaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS[-1]}]
    assert reloaded.chat_template == original.chat_template
    assert reloaded.apply_chat_template(chat, add_generation_prompt=True) == original.apply_chat_template(
        chat, add_generation_prompt=True
    )
    # transformers' GGUF reader takes Qwen's special tokens from its own defaults; llama.cpp reads the file's
    assert (llama_cpp(out).token_eos(), original.eos_token_id) == (2, 2)


# -- Ollama ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "name", "default_system"),
    [(CHATML, "ChatML", "You are tiny."), (LLAMA3, "Llama 3", None), (GEMMA, "Gemma", None)],
)
def test_the_modelfile_template_renders_what_the_jinja_template_does(tmp_path, template, name, default_system) -> None:
    """The Go template is run (tests/gotemplate.py, Go's rules) on the data Ollama gives it, and must write
    the Jinja template's prompt, less the BOS llama.cpp adds, for chats with and without a system message."""
    from gotemplate import ollama_values, render
    from transformers import AutoTokenizer

    from qlora_plugin.tools.ollama import PROBES, chat_format, modelfile

    family = {"ChatML": "qwen2", "Llama 3": "llama", "Gemma": "gemma3"}[name]
    family_model(family, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.chat_template == template
    fmt = chat_format(tokenizer)
    text = modelfile("model.gguf", fmt, "adapter")
    assert fmt.name == name and "FROM ./model.gguf\n" in text and f'TEMPLATE """{fmt.template}"""' in text
    assert all(f'PARAMETER stop "{stop}"' in text for stop in fmt.stops) and tokenizer.eos_token in fmt.stops
    chats = [list(p) for p in PROBES] + [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    ]
    for chat in chats:
        expected = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        if tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:  # llama.cpp adds BOS: the template must not
            expected = expected.removeprefix(tokenizer.bos_token)
        assert render(fmt.template, ollama_values(chat)) == expected, chat
    if default_system:
        assert default_system in fmt.template


def test_export_refuses_a_chat_template_it_cannot_write_for_ollama(families, tmp_path) -> None:
    line = rejected("export", families["mistral"], "--format", "gguf", "--out", "m.gguf", "--ollama", cwd=tmp_path,
                    names=("chat_template", "Fix: "), value=None)  # fmt: skip
    assert "ChatML" in line and "Llama 3" in line and "without --ollama" in line


def test_export_writes_the_modelfile_beside_the_gguf(families, tmp_path) -> None:
    done = run_qlora(
        "export", families["qwen2"], "--format", "gguf", "--out", tmp_path / "q.gguf", "--ollama", "--json"
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["chat_format"] == "ChatML" and summary["modelfile"] == str(tmp_path / "Modelfile")
    text = (tmp_path / "Modelfile").read_text()
    assert "FROM ./q.gguf\n" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "q.gguf"]


# -- bad input: one line naming the field, the value and the fix; nothing written -------------------------


def rejected(*args, cwd: Path, names: tuple[str, ...], value: str | None) -> str:
    before = snapshot(cwd)
    result = run_qlora(*args, cwd=cwd)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    errors = [line for line in stderr_lines(result.stderr) if ": error: " in line]
    assert len(errors) == 1, result.stderr
    assert_one_line_error(errors[0], *names, value=value)
    assert snapshot(cwd) == before
    return errors[0]


def test_export_refuses_an_adapter_for_another_base(adapter_dir, tiny_model_dir, tmp_path) -> None:
    line = rejected(
        "export", adapter_dir, "--format", "gguf", "--out", "m.gguf", "--base", tiny_model_dir,
        cwd=tmp_path, names=("ADAPTER_DIR", "adapter_model.safetensors", "--base"), value=str(adapter_dir),
    )  # fmt: skip
    assert "does not fit the base" in line and ".lora_A.weight of shape [16, 384]" in line


def test_merge_refuses_an_adapter_for_another_base_too(adapter_dir, tiny_model_dir, tmp_path) -> None:
    rejected("merge", adapter_dir, "--out", "merged", "--base", tiny_model_dir, cwd=tmp_path,
             names=("ADAPTER_DIR", "--base"), value=str(adapter_dir))  # fmt: skip


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}, "load_in_8bit"),
        ({"model_type": "llama"}, "no quantization_config"),
    ],
)
def test_export_refuses_an_adapter_trained_without_a_4bit_base(adapter_dir, tmp_path, config, says) -> None:
    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run)
    (run / "qlora_recipe.json").unlink()
    (run / "config.json").write_text(json.dumps(config))
    line = rejected("export", "run", "--format", "gguf", "--out", "m.gguf", cwd=tmp_path,
                    names=("config.json", "not 4-bit", "merge_and_unload"), value=says)  # fmt: skip
    assert "--quant-type" in line


def test_export_refuses_an_unsupported_architecture(tmp_path) -> None:
    from transformers import Phi3Config

    config = Phi3Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4)
    config.architectures = ["Phi3ForCausalLM"]
    config.save_pretrained(tmp_path / "phi")
    line = rejected("export", "phi", "--format", "gguf", "--out", "m.gguf", cwd=tmp_path,
                    names=("architecture", "Fix: "), value="Phi3ForCausalLM")  # fmt: skip
    assert "Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3" in line


@pytest.mark.parametrize(
    ("out", "names", "value"),
    [
        ("adapter/model.gguf", ("--out", "inside the input"), "adapter/model.gguf"),
        ("base/model.gguf", ("--out", "inside the input"), "base/model.gguf"),
        ("taken.gguf", ("--out", "--force"), "taken.gguf"),
        ("model.bin", ("--out", ".gguf"), "model.bin"),
        ("folder.gguf", ("--out", "directory"), "folder.gguf"),
    ],
)
def test_export_refuses_an_out_it_would_damage(adapter_dir, base_dir, tmp_path, out, names, value) -> None:
    shutil.copytree(adapter_dir, tmp_path / "adapter")
    shutil.copytree(base_dir, tmp_path / "base")
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    (tmp_path / "adapter/adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "base"}))
    (tmp_path / "taken.gguf").write_text("the user's file")
    (tmp_path / "folder.gguf").mkdir()
    rejected("export", "adapter", "--format", "gguf", "--out", out, cwd=tmp_path, names=names, value=value)


def test_export_refuses_a_tokenizer_llama_cpp_cannot_read(tiny_model_dir, tmp_path) -> None:
    """tests/tiny.py's word-level tokenizer: llama.cpp has no word-level vocabulary."""
    rejected("export", tiny_model_dir, "--format", "gguf", "--out", "m.gguf", cwd=tmp_path,
             names=("tokenizer.json model.type", "BPE"), value="WordLevel")  # fmt: skip


def test_the_python_function_raises_the_same_errors(adapter_dir, tmp_path) -> None:
    with pytest.raises(QLoRAConfigError, match=r"--type='q2_k': is not a GGUF type"):
        export_gguf(adapter_dir, tmp_path / "m.gguf", "q2_k")
    assert list(tmp_path.iterdir()) == []


# -- writes: all or nothing ------------------------------------------------------------------------------


def limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # bytes; the f16 file needs about 2 MB


def test_a_full_disk_leaves_no_file_and_the_old_one_intact(adapter_dir, tmp_path) -> None:
    from cli_helpers import SRC, qlora_command

    old = tmp_path / "model.gguf"
    old.write_text("the previous export")
    before = snapshot(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    args = ["export", str(adapter_dir), "--format", "gguf", "--out", str(old), "--force"]
    done = subprocess.run([*qlora_command(), *args], capture_output=True, text=True, env=env,
                          preexec_fn=limit_file_size, timeout=600)  # fmt: skip
    assert done.returncode == 1, done.stderr
    last = stderr_lines(done.stderr)[-1]
    assert last.startswith("qlora export: failed: the disk is full, or a file-size limit was reached"), done.stderr
    assert snapshot(tmp_path) == before and old.read_text() == "the previous export"


def test_a_full_tmpfs_leaves_nothing(adapter_dir, tmp_path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    if not mount_tmpfs(disk, "256k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        done = run_qlora("export", adapter_dir, "--format", "gguf", "--out", disk / "model.gguf")
        assert done.returncode == 1 and "the disk is full" in done.stderr, done.stderr
        assert list(disk.iterdir()) == []
    finally:
        unmount(disk)


def test_force_replaces_the_file_and_the_modelfile_together(families, tmp_path) -> None:
    out = tmp_path / "m.gguf"
    assert export_gguf(families["qwen2"], out, "q8_0", ollama=True, show_progress=False)["type"] == "q8_0"
    first = out.stat().st_size
    with pytest.raises(QLoRAConfigError, match="exists"):
        export_gguf(families["qwen2"], out, "f16", ollama=True, show_progress=False)
    export_gguf(families["qwen2"], out, "f16", ollama=True, force=True, show_progress=False)
    assert out.stat().st_size > first and (tmp_path / "Modelfile").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "m.gguf"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
    link = tmp_path / "link.gguf"
    link.symlink_to(out.name)
    export_gguf(families["qwen2"], link, "q8_0", force=True, show_progress=False)
    assert link.is_symlink() and out.stat().st_size == first  # the link stays; its target is replaced


def current_umask() -> int:
    from qlora_plugin.core.safe_io import current_umask as umask

    return umask()
