"""A transformers tokenizer as GGUF's ``tokenizer.*`` keys, in the two kinds llama.cpp reads.

- **Byte-level BPE** (GPT-2 style: Llama 3, Qwen, SmolLM) becomes ``tokenizer.ggml.model = "gpt2"``
  with the merges and a pre-tokenizer name. llama.cpp has a fixed splitting rule per name, so the
  name is chosen by what ``tokenizer.json`` splits with (:data:`PRE_TOKENIZERS`); an unknown rule
  is refused rather than written as llama.cpp's default, which would split text differently.
- **SentencePiece-style BPE** (``▁`` for spaces, often with ``<0xNN>`` byte tokens: Llama 2,
  Mistral, Gemma) becomes ``"llama"``, whose tokenizer merges by score: each token scores minus the
  rank of the merge that makes it, so the highest score is the merge transformers applies first.
  The merges are written too, so that transformers rebuilds the same tokenizer from the file.

Special-token ids and whether BOS/EOS are added come from the tokenizer itself (by encoding a
word), the chat template from where transformers keeps it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_plugin.core.errors import QLoRAConfigError

if TYPE_CHECKING:
    from gguf import GGUFWriter

# Token types (llama.cpp's llama_token_type, the gguf package's TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# The splitting rules of tokenizer.json's pre-tokenizers that llama.cpp implements, by its name for them.
_LETTERS = r"[^\r\n\p{L}\p{N}]?\p{L}+"
_TAIL = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
PRE_TOKENIZERS = {
    ("bytelevel",): "gpt-2",
    ("digits", "bytelevel"): "smollm",  # each digit alone, then GPT-2's rule (llama.cpp's starcoder/smollm)
    (f"split:{_CONTRACTIONS}|{_LETTERS}|\\p{{N}}{{1,3}}|{_TAIL}", "bytes"): "llama-bpe",  # Llama 3
    (f"split:{_CONTRACTIONS}|{_LETTERS}|\\p{{N}}|{_TAIL}", "bytes"): "qwen2",  # Qwen2, Qwen2.5, Qwen3
}
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocab:
    """What GGUF stores of a tokenizer."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad (llama.cpp's names)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | list[dict[str, str]] | None = None
    notes: list[str] = field(default_factory=list)


def read_vocab(tokenizer_dir: str | os.PathLike[str], vocab_size: int) -> Vocab:
    """The GGUF vocabulary of the tokenizer saved in ``tokenizer_dir``, padded to the model's ``vocab_size`` rows."""
    from transformers import AutoTokenizer

    directory = Path(tokenizer_dir)
    source = directory / "tokenizer.json"
    if not source.is_file():
        raise QLoRAConfigError(
            "tokenizer.json",
            os.fspath(source),
            "is missing: GGUF export reads the fast tokenizer's file",
            "save the tokenizer with the model (tokenizer.save_pretrained(folder)) and export again",
        )
    spec = json.loads(source.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise QLoRAConfigError(
            "tokenizer.json model.type",
            model.get("type"),
            "is not BPE: llama.cpp reads byte-level BPE and SentencePiece-style BPE tokenizers here",
            "export a model whose tokenizer is BPE (Llama, Mistral, Qwen, Gemma, SmolLM)",
        )
    tokenizer = AutoTokenizer.from_pretrained(directory)
    added = {int(t["id"]): t for t in spec.get("added_tokens", [])}
    by_id = {int(i): t for t, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    if max(by_id) >= vocab_size:
        raise QLoRAConfigError(
            "tokenizer.json",
            f"{max(by_id) + 1} tokens",
            f"has more tokens than the model's embedding has rows ({vocab_size})",
            "export the tokenizer the model was trained with (the adapter's own, or the base's)",
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    kind = _kind(spec)
    vocab = Vocab(kind, None, [], [], None, merges)
    rank = _merge_ranks(merges) if kind == "llama" else {}
    unk = tokenizer.unk_token
    scores = []
    for index in range(vocab_size):
        text = by_id.get(index)
        if text is None:
            vocab.tokens.append(f"[PAD{index}]")
            vocab.types.append(UNUSED)
            scores.append(-1e9)
            continue
        vocab.tokens.append(text)
        if index in added:
            vocab.types.append(CONTROL if added[index].get("special") else USER_DEFINED)
        elif kind == "llama" and text == unk:
            vocab.types.append(UNKNOWN)
        elif kind == "llama" and BYTE_TOKEN.fullmatch(text):
            vocab.types.append(BYTE)
        else:
            vocab.types.append(NORMAL)
        scores.append(0.0 if index in added else float(-rank.get(text, len(merges) + index)))
    if kind == "gpt2":
        vocab.pre = _pre_name(spec)
    else:
        vocab.scores = scores
        vocab.add_space_prefix = _adds_space_prefix(spec)
        if _splits_before_merging(spec):
            vocab.notes.append(
                "the tokenizer splits text by a pattern (e.g. at newlines) before merging; llama.cpp's "
                "SentencePiece tokenizer does not, so such texts may get other tokens there"
            )
    _special_tokens(vocab, tokenizer)
    vocab.chat_template = getattr(tokenizer, "chat_template", None)
    return vocab


def _kind(spec: dict[str, Any]) -> str:
    parts = _pre_parts(spec.get("pre_tokenizer"))
    if any(p.get("type") == "ByteLevel" for p in parts) or (spec.get("decoder") or {}).get("type") == "ByteLevel":
        return "gpt2"
    described = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("decoder")], ensure_ascii=False)
    if "\u2581" in described or spec["model"].get("byte_fallback"):
        return "llama"
    raise QLoRAConfigError(
        "tokenizer.json pre_tokenizer",
        [p.get("type") for p in parts] or None,
        "is neither byte-level BPE nor SentencePiece-style (▁ for spaces)",
        "export a model with a byte-level (GPT-2 style) or SentencePiece-style tokenizer",
    )


def _pre_parts(pre: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not pre:
        return []
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


def _pre_name(spec: dict[str, Any]) -> str:
    signature = []
    for part in _pre_parts(spec.get("pre_tokenizer")):
        kind = part.get("type")
        if kind == "ByteLevel" and not part.get("add_prefix_space", False):
            signature.append("bytelevel" if part.get("use_regex", True) else "bytes")
        elif kind == "Digits" and part.get("individual_digits"):
            signature.append("digits")
        elif kind == "Split" and "Regex" in (part.get("pattern") or {}) and part.get("behavior") == "Isolated":
            signature.append("split:" + part["pattern"]["Regex"])
        else:
            signature.append(json.dumps(part, sort_keys=True))
    name = PRE_TOKENIZERS.get(tuple(signature))
    if name is None:
        raise QLoRAConfigError(
            "tokenizer.json pre_tokenizer",
            [p.get("type") for p in _pre_parts(spec.get("pre_tokenizer"))],
            "splits text by a rule this export cannot name for llama.cpp (it would split differently)",
            "export a model with the pre-tokenizer of GPT-2, SmolLM, Llama 3 or Qwen2/3",
        )
    return name


def _merge_ranks(merges: list[str]) -> dict[str, int]:
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        ranks.setdefault(merge.replace(" ", "", 1), rank)
    return ranks


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    normalizer = spec.get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    if any(s.get("type") == "Prepend" for s in steps):
        return True
    return any(
        p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") in ("always", "first")
        for p in _pre_parts(spec.get("pre_tokenizer"))
    )


def _splits_before_merging(spec: dict[str, Any]) -> bool:
    return any(p.get("type") == "Split" for p in _pre_parts(spec.get("pre_tokenizer")))


def _special_tokens(vocab: Vocab, tokenizer: Any) -> None:
    for name, attribute in (
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("unk", "unk_token_id"),
        ("pad", "pad_token_id"),
    ):
        token_id = getattr(tokenizer, attribute, None)
        if isinstance(token_id, int):
            vocab.special_ids[name] = token_id
    ids = tokenizer("hello", add_special_tokens=True)["input_ids"]
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    vocab.add_bos = "bos" in vocab.special_ids and ids[:1] == [vocab.special_ids["bos"]] and plain[:1] != ids[:1]
    vocab.add_eos = "eos" in vocab.special_ids and ids[-1:] == [vocab.special_ids["eos"]] and plain[-1:] != ids[-1:]


def write_vocab(writer: GGUFWriter, vocab: Vocab) -> None:
    """Add ``vocab`` to ``writer`` under llama.cpp's ``tokenizer.*`` keys."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre or "default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    handlers = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for name, token_id in vocab.special_ids.items():
        handlers[name](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
