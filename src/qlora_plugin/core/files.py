"""Files and directories a user names, each fault named as what it is.

Python's and the libraries' own errors say "No such file or directory" for a file
that exists but cannot be read, "does not exist" for a directory given where a
file belongs, and a network error for a local adapter without its weights (PEFT
then asks the hub). These helpers look first and raise :class:`QLoRAConfigError`
with the path, what is wrong with it (missing, a dangling link, a directory, not
a regular file, unreadable, not text, not JSON) and the fix. :func:`looks_local`
says whether a name must be read from disk (the hub is never asked for it);
:func:`hub_offline` whether the hub may be asked at all (with ``HF_HUB_OFFLINE``
set, a hub id is read from the local hub cache only).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

from qlora_plugin.core.errors import QLoRAConfigError

LOCAL_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_offline() -> bool:
    """True while ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) forbids the hub."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_VARIABLES)


def looks_local(name: str | os.PathLike[str]) -> bool:
    """True for a name that can only be a path: it starts like one, or exists, or is no valid hub id."""
    text = os.fspath(name)
    if text.startswith(LOCAL_PREFIXES) or text in (".", "..") or os.path.lexists(os.path.expanduser(text)):
        return True
    parts = text.split("/")
    return len(parts) > 2 or any(part in ("", ".", "..") for part in parts)


def path_problem(path: Path, want: str) -> str | None:
    """What keeps ``path`` from being the ``want`` (``"file"`` or ``"directory"``) it should be, or None."""
    if not os.path.lexists(path):
        return "does not exist"
    try:
        info = path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symbolic link that loops"
        if error.errno == errno.ENOENT:
            return f"is a symbolic link to {os.readlink(path)!r}, which does not exist"
        return f"cannot be read ({error.strerror or error})"
    if want == "file" and stat.S_ISDIR(info.st_mode):
        return "is a directory, not a file"
    if want == "file" and not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if want == "directory" and not stat.S_ISDIR(info.st_mode):
        return "is a file, not a directory"
    mode = os.R_OK | (os.X_OK if want == "directory" else 0)
    if not os.access(path, mode):
        return "cannot be read (permission denied)"
    return None


def require(path: str | os.PathLike[str], want: str, field: str, fix: str) -> Path:
    """``path`` as a :class:`Path` if it is a readable ``want`` (file or directory); else one clear error."""
    found = Path(os.path.expanduser(os.fspath(path)))
    problem = path_problem(found, want)
    if problem is not None:
        raise QLoRAConfigError(field, os.fspath(path), problem, fix)
    return found


def read_text(path: str | os.PathLike[str], field: str, fix: str) -> str:
    """The text of the file at ``path`` (UTF-8); a missing, unreadable or binary file is one clear error."""
    found = require(path, "file", field, fix)
    try:
        return found.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QLoRAConfigError(field, os.fspath(path), "is not UTF-8 text", fix) from None
    except OSError as error:
        raise QLoRAConfigError(field, os.fspath(path), f"cannot be read ({error.strerror or error})", fix) from None


def read_json(path: str | os.PathLike[str], field: str, fix: str) -> Any:
    """The JSON value in the file at ``path``; every way it can fail is one clear error."""
    text = read_text(path, field, fix)
    try:
        return json.loads(text)
    except ValueError as error:
        where = f" at line {error.lineno}" if isinstance(error, json.JSONDecodeError) else ""
        raise QLoRAConfigError(
            field, os.fspath(path), f"is not valid JSON{where} ({getattr(error, 'msg', error)})", fix
        ) from None
