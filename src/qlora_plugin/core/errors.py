"""The error raised for bad recipe input."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class QLoRAConfigError(ValueError):
    """A recipe field holds a value that cannot work.

    The message names the field, the value and the fix; the three are also
    kept as attributes for programs that report them their own way.
    """

    def __init__(self, field: str, value: Any, problem: str, fix: str) -> None:
        self.field, self.value, self.problem, self.fix = field, value, problem, fix
        stop = "" if problem.endswith((".", "?", "!")) else "."
        super().__init__(one_line(f"{field}={value!r}: {problem}{stop} Fix: {fix}"))


def one_line(text: str) -> str:
    """``text`` with every character that ends a line (``\r``, ``\x85``, ``\u2028``, ...) or is a control
    character written as its escape, so a message that quotes user input stays one line on any terminal."""
    return "".join(char if char.isprintable() or char == " " else repr(char)[1:-1] for char in text)


def nearest(word: str, choices: Iterable[str]) -> str:
    """Return '. Did you mean ...?' for the closest choice (a sentence after the problem's), or ''."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f". Did you mean {close[0]!r}?" if close else ""
