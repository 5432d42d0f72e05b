"""What every rejected input must look like, and proof that nothing was written, changed or left behind."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

# "field Did you mean 'x'?. Fix: ...": a new sentence with no stop before it, or a stop after a question
SENTENCES_RUN_TOGETHER = re.compile(r"[\w')\]] (Did you|Fix:)|[?!]\.")


def assert_one_line_error(message: str, *names: str, value: str | None = None) -> None:
    """``message`` is one line naming each of ``names`` (field or file) and ``value``, with a fix that says more."""
    message = message.strip()
    assert message, "no error message"
    assert "\n" not in message, f"more than one line:\n{message}"
    assert "Traceback" not in message, message
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"
    if value is not None:
        assert value in message, f"value {value!r} not shown in: {message}"
    assert "Fix: " in message, f"no fix in: {message}"
    assert not SENTENCES_RUN_TOGETHER.search(message), f"sentences run together in: {message}"
    fix = message.rsplit("Fix: ", 1)[1].strip()
    assert len(fix) > 12, f"the fix says too little: {message}"
    if value is not None:
        assert fix.strip(" .'\"") != value.strip(" .'\""), f"the fix only repeats the input: {message}"


def snapshot(directory: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and directory under ``directory`` (hidden ones too) with its size, mtime and mode."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = Path(root) / name
            stat = path.lstat()
            found[os.fspath(path.relative_to(directory))] = (
                stat.st_size if name in files else 0,
                stat.st_mtime_ns,
                stat.st_mode,
            )
    return found


def stderr_lines(stderr: str) -> list[str]:
    """The lines a person reads on stderr (progress-bar redraws and blank lines left out)."""
    return [line for line in stderr.splitlines() if line.strip() and "━" not in line]


def mount_tmpfs(point: Path, size: str = "1m") -> bool:
    """Mount a small tmpfs at ``point`` (an existing, empty directory); False where this machine does not allow it."""
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", os.fspath(point)], check=False, capture_output=True
        )
    except OSError:
        return False
    return done.returncode == 0


def unmount(point: Path) -> None:
    subprocess.run(["umount", os.fspath(point)], check=True, capture_output=True)
