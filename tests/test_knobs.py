"""Every ``QLORA_*`` knob (qlora_plugin.core.environment), by property: a value it can read is read,
and any other value is reported in one line naming the variable and the value, with the default kept.

The tables below must name every field of ``Knobs``: a new knob without a row here fails the first test.
"""

from __future__ import annotations

import dataclasses
import os
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_plugin.core import environment
from qlora_plugin.core.environment import OFF, ON, Knobs, read_knobs, show_traceback, untested_patches_allowed

SWITCHES = {
    environment.FAST_PATH_ON_CPU: "fast_path_on_cpu",
    environment.CUDA_GRAPHS: "cuda_graphs",
    environment.RECOMPUTE_GRAPHS: "recompute_graphs",
    environment.PACKED_ATTENTION: "packed_attention",
    environment.TORCH_CHECKPOINT: "torch_checkpoint",
}
COUNTS = {
    environment.TILED_MLP: "tiled_mlp_min_tokens",
    environment.OFFLOAD_KEEP_LAYERS: "offload_keep_layers",
    environment.KEEP_MLP_LAYERS: "keep_mlp_layers",
    environment.PARK_MLP_LAYERS: "park_mlp_layers",
}
DEFAULTS = Knobs()
EXAMPLES = settings(max_examples=60, deadline=None, derandomize=True, database=None)


def _spelled(words: tuple[str, ...]) -> st.SearchStrategy[str]:
    """One of ``words`` in any mix of cases, with spaces around it."""

    def spellings(word: str) -> st.SearchStrategy[str]:
        cases = st.lists(st.booleans(), min_size=len(word), max_size=len(word))
        spaced = st.tuples(cases, st.sampled_from(["", " ", "\t"]), st.sampled_from(["", " ", "\n"]))
        return spaced.map(
            lambda parts: (
                parts[1] + "".join(c.upper() if up else c for c, up in zip(word, parts[0], strict=True)) + parts[2]
            )
        )

    return st.sampled_from(words).flatmap(spellings)


def test_every_knob_and_every_variable_has_a_row():
    fields = {f.name for f in dataclasses.fields(Knobs)} - {"problems"}
    assert set(SWITCHES.values()) | set(COUNTS.values()) == fields
    variables = {
        value for name, value in vars(environment).items() if name.isupper() and str(value).startswith("QLORA_")
    }
    assert variables == set(SWITCHES) | set(COUNTS) | {environment.UNTESTED_PATCHES, environment.TRACEBACK}


@EXAMPLES
@given(name=st.sampled_from(sorted(SWITCHES)), on=st.booleans(), data=st.data())
def test_a_switch_reads_every_spelling_of_on_and_off(name, on, data):
    value = data.draw(_spelled(ON if on else OFF))
    knobs = read_knobs({name: value})
    assert getattr(knobs, SWITCHES[name]) is on
    assert knobs.problems == ()


@EXAMPLES
@given(
    name=st.sampled_from(sorted(SWITCHES)),
    value=st.text(min_size=1, max_size=12).filter(lambda v: v.strip() and v.strip().lower() not in ON + OFF),
)
def test_a_switch_reports_any_other_value_and_keeps_its_default(name, value):
    knobs = read_knobs({name: value})
    field = SWITCHES[name]
    assert getattr(knobs, field) is getattr(DEFAULTS, field)
    assert len(knobs.problems) == 1
    line = knobs.problems[0]
    assert f"{name}={value.strip()!r}" in line and "\n" not in line and "using the default" in line


@EXAMPLES
@given(name=st.sampled_from(sorted(COUNTS)), count=st.integers(min_value=0, max_value=10**6))
def test_a_count_reads_any_whole_number(name, count):
    knobs = read_knobs({name: f" {count} "})
    assert getattr(knobs, COUNTS[name]) == count
    assert knobs.problems == ()


@EXAMPLES
@given(
    name=st.sampled_from(sorted(COUNTS)),
    value=st.one_of(
        st.integers(max_value=-1).map(str),
        st.text(min_size=1, max_size=12).filter(lambda v: v.strip() and not v.strip().isdigit()),
    ),
)
def test_a_count_reports_anything_else_and_keeps_its_default(name, value):
    try:
        if int(value) >= 0:  # int() also reads forms like "+3" or "٣": those are whole numbers too
            return
    except ValueError:
        pass
    knobs = read_knobs({name: value})
    field = COUNTS[name]
    assert getattr(knobs, field) == getattr(DEFAULTS, field)
    assert len(knobs.problems) == 1 and f"{name}={value.strip()!r}" in knobs.problems[0]


@EXAMPLES
@given(on=st.booleans(), data=st.data())
def test_the_two_process_switches_read_the_same_spellings(on, data):
    value = data.draw(_spelled(ON if on else OFF))
    with mock.patch.dict(os.environ, {environment.UNTESTED_PATCHES: value, environment.TRACEBACK: value}):
        assert untested_patches_allowed() is on
        assert show_traceback() is on


def test_unset_or_unknown_process_switches_stay_safe():
    with mock.patch.dict(os.environ, {}, clear=True):
        assert not untested_patches_allowed() and not show_traceback()
    with mock.patch.dict(os.environ, {environment.UNTESTED_PATCHES: "maybe", environment.TRACEBACK: "full"}):
        assert not untested_patches_allowed()  # patches outside their versions only when asked plainly
        assert show_traceback()  # any other word asks for more output, which harms nothing


def test_the_docs_table_names_every_variable():
    """docs/fast-path.md's knob table: one row per variable the package reads."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "fast-path.md").read_text()
    rows = {line.split("`")[1] for line in text.splitlines() if line.startswith("| `QLORA_")}
    assert rows == set(SWITCHES) | set(COUNTS) | {environment.UNTESTED_PATCHES, environment.TRACEBACK}
