"""Output helpers of the ``qlora`` command: rich tables for people, JSON for programs."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from typing import Any

GIB = 1024**3
# Environment switches that keep libraries from printing banners, notices and progress bars.
QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "BITSANDBYTES_NOWELCOME": "1",
}
# Loggers that libraries give a level of their own (so the root's does not reach them), or that
# print notices at import: torch's pytree deprecations, torchao's optional libraries, bitsandbytes'
# offline kernel notice, and the kernels hub's offline trust notice (kernels >= 0.17, beside Axolotl 0.21).
QUIET_LOGGERS = (
    "torch.utils._pytree",
    "torchao",
    "bitsandbytes",
    "transformers",
    "accelerate",
    "peft",
    "datasets",
    "huggingface_hub",
    "kernels",
)


def quiet_third_party(verbose: bool = False) -> None:
    """Keep other libraries' warnings and notices out of the command's output (all of them with ``verbose``).

    Runs before any of them is imported: Python warnings are ignored, loggers
    without a level of their own (torchao, bitsandbytes, torch's pytree notices,
    transformers) show errors only, and transformers / the hub are asked not to
    draw progress bars. The command's own messages are printed, not logged.
    """
    if verbose:
        return
    warnings.simplefilter("ignore")
    for name in ("", *QUIET_LOGGERS):
        logging.getLogger(name).setLevel(logging.ERROR)
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def console(stderr: bool = False) -> Any:
    """A rich console; wide enough for the tables when output is not a terminal."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(file=stream, width=None if stream.isatty() else 120, highlight=False)


def table(title: str | None, columns: list[str], rows: list[list[Any]], right: set[int] | None = None) -> Any:
    """A rich table with ``columns``; the columns at ``right`` are right-aligned (numbers)."""
    from rich.table import Table

    result = Table(title=title, title_justify="left", show_edge=False)
    for index, name in enumerate(columns):
        result.add_column(name, justify="right" if right and index in right else "left")
    for row in rows:
        result.add_row(*(str(value) for value in row))
    return result


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def count(number: int) -> str:
    """``11272192`` -> ``11.27M``."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= size:
            return f"{number / size:.2f}{suffix}"
    return str(number)
