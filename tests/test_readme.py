"""README's shape: short, every section in its contents line, the default job's base scores stated once."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
RESULTS = REPO / "benchmarks" / "results"


def test_readme_is_at_most_300_lines_and_its_contents_line_lists_every_section() -> None:
    assert len(README.splitlines()) <= 300
    contents = next(paragraph for paragraph in README.split("\n\n") if paragraph.startswith("Contents: "))
    for title in re.findall(r"^## (.+)$", README, flags=re.M):
        anchor = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        assert f"(#{anchor})" in contents, title
    for link in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (REPO / link).exists(), link


def base_scores() -> dict[str, str]:
    """Each zero-shot score of the default job's base model in the committed results, by what it measures."""
    quant = (RESULTS / "cpu-quant-error" / "quant_error.md").read_text(encoding="utf-8")
    quality = (RESULTS / "run9-quality" / "quality.md").read_text(encoding="utf-8")
    found = {
        storage: re.search(rf"\| sentiment \| {storage} \|.*\| ([\d.]+ %) \|", quant)[1]  # type: ignore[index]
        for storage in ("bf16", "nf4")
    }
    found["bf16 on a GPU"] = re.search(r"^\| base \| 1 \|.*?\| ([\d.]+ %) ±", quality, flags=re.M)[1]  # type: ignore[index]
    return found


def test_readme_states_the_base_scores_once_with_what_each_measures() -> None:
    """The same base scores 40.7 % in the job and 44-57 % in the benchmarks: README says why, in one place."""
    paragraph = next(p for p in README.split("\n\n") if p.startswith("**Base scores.**"))
    flat = " ".join(paragraph.split())
    assert "40.7 %" in flat and "NF4 with float32 compute" in flat and "label scoring" in flat
    scores = base_scores()
    assert scores == {"bf16": "55.0 %", "nf4": "44.0 %", "bf16 on a GPU": "57.0 %"}
    assert f"{scores['bf16']} stored in bf16 and {scores['nf4']} in NF4" in flat
    assert f"{scores['bf16 on a GPU']} in bf16 on a GPU" in flat
    elsewhere = README.replace(paragraph, "")
    for score in [*scores.values(), "41.3 %"]:
        assert score not in elsewhere, score
    assert elsewhere.count("40.7") == 1  # the job's own closing lines, shown once
