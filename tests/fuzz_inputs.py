"""The fuzz harness's pieces: Hypothesis settings, value strategies, and the invariants every input must keep.

Invariants (issue 23): a ``qlora`` command exits 0, or 2 with one line on stderr that names the
input, the value and a fix; never a traceback, never ``failed: <Python exception>``; on exit 2
nothing in the working directory changed, and on exit 0 only ``--out`` did. The Python entry
points return, or raise :class:`QLoRAConfigError` with one such line.

Example counts: ``QLORA_FUZZ_EXAMPLES`` scales them (default 1: the bounded CI run, derandomized so
CI sees the same inputs each time, no example database written). ``QLORA_FUZZ_EXAMPLES=20`` explores
20 times as many, randomly, and reports a failure with the seed to reproduce it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

from bad_inputs import snapshot, stderr_lines
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

SCALE = max(1, int(os.environ.get("QLORA_FUZZ_EXAMPLES", "1") or 1))
# the problem ends with a stop, or with the question of a suggestion ("Did you mean ...?")
ERROR_LINE = re.compile(r"^qlora(?: [a-z-]+)?: error: (?P<what>.+?)[.?] Fix: (?P<fix>.{12,})$")


def fuzz_settings(examples: int) -> settings:
    """Hypothesis settings for ``examples`` inputs (times the scale); derandomized unless scaled up."""
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        derandomize=SCALE == 1,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
    )


# -- values ---------------------------------------------------------------------------------------------

NUMBERS = st.one_of(
    st.integers(-3, 70),
    st.sampled_from([0, -1, 1, 2**31, 10**12, 65, 4096]),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.5, 1e-4, -0.1, 16.0, 1.0]),
)
TEXTS = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=10),
    st.sampled_from(["", " ", "auto", "nf4", "fp4", "bf16", "q_proj", "[q_proj", ".*", "none", "True", "2e-4", "x/y"]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXTS)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXTS, inner, max_size=3)),
    max_leaves=5,
)
# A value as a command line or a YAML file spells it: numbers, words, lists, maps, broken syntax.
YAML_WORDS = st.one_of(
    st.sampled_from(
        [
            "8",
            "0",
            "-1",
            "16.5",
            ".nan",
            ".inf",
            "nan",
            "true",
            "false",
            "null",
            "",
            "[q_proj, v_proj]",
            "[]",
            "{a: 1}",
            "[",
            "'",
            "2e-4",
            "fast",
            "offload",
            "auto",
            "nf4",
            "fp4",
            "bf16",
            "uint8",
            "q_proj,v_proj",
            ".*",
            "paged_adamw_8bit",
            "cosine",
        ]
    ),
    st.integers(-5, 10**6).map(str),
    st.text(st.characters(codec="ascii", min_codepoint=32, max_codepoint=126), max_size=8),
)


def finite(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value)


# -- running the command in-process ------------------------------------------------------------------


@contextlib.contextmanager
def as_found() -> Iterator[None]:
    """Put back what ``qlora`` changes in the process: the working directory, warnings filters, log levels and
    the environment variables it sets (it quiets third-party output for its own run)."""
    from qlora_plugin.tools.console import QUIET_LOGGERS

    cwd = os.getcwd()
    environ = dict(os.environ)
    loggers = {name: logging.getLogger(name).level for name in ("", *QUIET_LOGGERS)}
    with warnings.catch_warnings():
        try:
            yield
        finally:
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(environ)
            for name, level in loggers.items():
                logging.getLogger(name).setLevel(level)


def run_cli(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """``qlora ARGV`` in-process from ``cwd``: (exit status, stdout, stderr)."""
    from qlora_plugin.commands.main import main

    out, err = io.StringIO(), io.StringIO()
    with as_found(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        os.chdir(cwd)
        try:
            status = main(argv)
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else 2
    return status, out.getvalue(), err.getvalue()


def check_cli(argv: list[str], cwd: Path, outs: tuple[Path, ...] = ()) -> tuple[int, str]:
    """Run ``qlora ARGV`` from ``cwd`` and hold it to the invariants; returns (status, stdout).

    ``outs``: the paths the command may write on success (its ``--out``); nothing else may change.
    """
    before = snapshot(cwd)
    status, stdout, stderr = run_cli(argv, cwd)
    lines = stderr_lines(stderr)
    shown = f"qlora {' '.join(map(repr, argv))}\nexit {status}\nstderr:\n{stderr}"
    assert "Traceback" not in stderr + stdout, shown
    assert not any(": failed: " in line for line in lines), shown
    assert status in (0, 2), shown
    if status == 2:
        errors = [line for line in lines if ": error: " in line]
        assert errors, shown
        if argv[0] != "check":  # check reports each problem on its line, then one summary line
            assert len(lines) == 1, shown
        for line in errors:
            assert ERROR_LINE.match(line), f"not one line with input, value and fix: {line!r}\n{shown}"
        assert snapshot(cwd) == before, f"changed the directory on failure\n{shown}"
    else:
        assert not any(": error: " in line for line in lines), shown
        after = snapshot(cwd)
        allowed = [os.fspath(out.relative_to(cwd)) for out in outs if out.is_relative_to(cwd)]
        changed = {name for name in set(before) | set(after) if before.get(name) != after.get(name)}
        stray = {name for name in changed if not any(name == a or name.startswith(a + os.sep) for a in allowed)}
        stray -= {name for name in stray if any(a.startswith(name + os.sep) for a in allowed)}  # the parents of --out
        assert not stray, f"wrote outside --out: {sorted(stray)}\n{shown}"
    return status, stdout


def check_raised(error: BaseException) -> None:
    """A rejected Python call: a QLoRAConfigError whose message is one line with a fix."""
    from qlora_plugin import QLoRAConfigError

    assert isinstance(error, QLoRAConfigError), f"{type(error).__name__}: {error}"
    message = str(error)
    assert "\n" not in message and "Traceback" not in message, message
    assert " Fix: " in message and len(message.rsplit("Fix: ", 1)[1]) >= 12, message
