"""The plugin's message as the last thing a failed training process prints.

``axolotl train`` shows an error as two tracebacks with the plugin's message in
the middle. Installed by the Axolotl plugin, this replaces the traceback of an
uncaught :class:`QLoRAConfigError` (also when it is the cause of another error)
with one line, ``qlora: error: <field>=<value>: <problem>. Fix: <fix>``, printed
as the process ends; ``QLORA_TRACEBACK=1`` shows the traceback as well. Other
errors keep their traceback. (Axolotl's default launcher, ``accelerate launch``,
prints its own ``CalledProcessError`` after the training process has ended;
``axolotl train CONFIG -- --quiet`` or ``--launcher python`` leaves this line last.)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

from qlora_plugin.core import patches
from qlora_plugin.core.environment import show_traceback
from qlora_plugin.core.errors import QLoRAConfigError

PATCH = "python-excepthook"
ExceptHook = Callable[[type[BaseException], BaseException, TracebackType | None], Any]


def install() -> None:
    """Put the one-line report in front of the process's exception hook (once; :mod:`qlora_plugin.core.patches`)."""
    patches.apply(PATCH, _reporting_before)


def plugin_error(error: BaseException | None) -> QLoRAConfigError | None:
    """The QLoRAConfigError in ``error``'s chain of causes, if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, QLoRAConfigError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def close_progress_bars() -> None:
    """Close open tqdm bars now, so their last redraw at shutdown does not land after the plugin's line."""
    tqdm = sys.modules.get("tqdm.std")
    if tqdm is None or not patches.allowed("tqdm-open-bars"):
        return
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


def _reporting_before(previous: ExceptHook) -> ExceptHook:
    """An exception hook that ends a recipe error with one line, and leaves the rest to ``previous``."""

    def report_uncaught(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        ours = plugin_error(error)
        if ours is None or show_traceback():
            previous(kind, error, traceback)
        if ours is not None:
            close_progress_bars()
            sys.stderr.flush()
            print(f"qlora: error: {ours}", file=sys.stderr, flush=True)

    return report_uncaught
