"""The examples README.md shows with their answers, so that tests run exactly what the README promises."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def shown_examples(script: str) -> list[tuple[list[str], str]]:
    """``(arguments, answer)`` for each README line ``... examples/<script> ARGS   # -> answer``."""
    pattern = re.compile(rf"examples/{re.escape(script)}\s+(.+?)\s+#\s*->\s*(\S+)")
    return [(shlex.split(match[1]), match[2]) for match in pattern.finditer(README.read_text(encoding="utf-8"))]
