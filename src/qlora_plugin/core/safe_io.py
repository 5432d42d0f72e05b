"""Writes that leave a whole result or nothing: files, directories, and the signals that stop them.

Everything is built beside its destination under a hidden temporary name and
renamed into place at the end; a failure or an interruption removes the
temporary copy. Results get the permissions ``mkdir`` and ``open`` would give
(the process umask), not the 0700/0600 of Python's ``tempfile`` (or of the
safetensors writer).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from qlora_plugin.core.errors import QLoRAConfigError

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_DISK_FULL_WORDS = ("No space left", "File too large", "Disk quota exceeded", "StorageFull", "FileTooLarge")


class Interrupted(BaseException):
    """A stop signal (SIGTERM, SIGHUP) turned into an exception, so cleanup code runs."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def current_umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_disk_full(error: BaseException) -> bool:
    """True for the errors a full disk or a file-size limit raises (also from Rust writers, by message)."""
    for cause in _chain(error):
        if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
            return True
        if any(words in str(cause) for words in _DISK_FULL_WORDS):
            return True
    return False


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def real_destination(path: str | os.PathLike[str]) -> Path:
    """Where a write to ``path`` lands: ``path``, or the target of the symbolic link it is.

    A link is honoured, never replaced: the new file or directory is renamed onto its target,
    and the link keeps pointing at it.
    """
    target = Path(path)
    return Path(os.path.realpath(target)) if target.is_symlink() else target


def write_text_atomically(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` (a link's target, for a link) through a temporary file beside it, with the
    umask's permissions."""
    target = real_destination(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def check_writable_destination(out: Path, field: str) -> None:
    """Refuse, before any work, a destination that cannot be replaced by a rename.

    The parent must be a writable directory (the temporary copy goes there), and
    ``out`` must not be a mount point (a rename onto one fails with "Device or
    resource busy" only at the very end). A symbolic link is checked as its target, which
    the write replaces (:func:`real_destination`); a link to nothing is refused.
    """
    if out.is_symlink():
        if not out.exists():
            raise QLoRAConfigError(
                field,
                os.fspath(out),
                f"is a symbolic link to {os.readlink(out)!r}, which does not exist (or loops)",
                "create the link's target first, or pass the path to write directly",
            )
        out = real_destination(out)
    existing = out.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise QLoRAConfigError(
            field,
            os.fspath(out),
            f"lies under {os.fspath(existing)}, which is a file",
            "choose a path whose parents are directories",
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise QLoRAConfigError(
            field,
            os.fspath(out),
            f"cannot be written: {os.fspath(existing)} is not writable",
            "choose a directory you can write to",
        )
    if out.is_dir() and os.path.ismount(out):
        raise QLoRAConfigError(
            field,
            os.fspath(out),
            "is a mount point, which cannot be replaced by the final rename",
            f"write into a new directory inside it, e.g. {field} {os.fspath(out / 'merged')}",
        )


def directory_mode(out: Path) -> int:
    """The mode a finished directory at ``out`` gets: the existing one's (replacing it), else mkdir's."""
    if out.is_dir():
        return stat.S_IMODE(out.stat().st_mode)
    return 0o777 & ~current_umask()


def give_normal_permissions(directory: Path, mode: int) -> None:
    """``directory`` gets ``mode``; what is inside gets the umask's modes (some writers create files 0600)."""
    mask = current_umask()
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
    os.chmod(directory, mode)


def remove_abandoned_copies(out: Path) -> list[Path]:
    """Remove temporary copies of ``out`` whose process is gone (SIGKILL leaves them; nothing else can).

    The copies are named ``.<name>.<pid>.<random>.partial``/``.old``; one whose
    process still runs (another merge into the same place) is left alone.
    """
    removed = []
    for path in out.parent.glob(f".{glob_escape(out.name)}.*"):
        parts = path.name[len(out.name) + 2 :].split(".")
        if len(parts) == 3 and parts[0].isdigit() and parts[2] in ("partial", "old") and not _alive(int(parts[0])):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out`` (a link's target, for a link) that becomes it if the block completes.

    Nothing is left behind whatever happens: on an exception (an interruption
    included) the temporary directory is removed, and one a killed process left
    is removed by the next call for the same ``out``; an existing ``out`` is moved
    aside and back if the final rename fails, and deleted once it succeeds.
    The two renames run with SIGINT and SIGTERM held, so a signal cannot fall between them.
    """
    out = real_destination(out)  # a link stays a link: its target is what gets replaced
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_copies(out)
    mode = directory_mode(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent))
    previous = staging.with_name(staging.name.removesuffix(".partial") + ".old")
    try:
        yield staging
        give_normal_permissions(staging, mode)
        with signals_held():
            moved_aside = False
            try:
                if out.exists():
                    os.rename(out, previous)
                    moved_aside = True
                os.rename(staging, out)
            except BaseException:
                if moved_aside:
                    os.rename(previous, out)
                raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def staged_files(outs: list[Path]) -> Iterator[list[Path]]:
    """Temporary files beside each of ``outs`` that replace them together if the block completes.

    As :func:`staged_directory`, for files that belong together (a model and the file that
    names it): on any exception every temporary file is removed and every ``out`` is as it
    was; existing ``outs`` are moved aside during the renames and put back if one fails. A link
    stays a link: its target is what gets replaced.
    """
    outs = [real_destination(out) for out in outs]
    mask = current_umask()
    staged: list[Path] = []
    try:
        for out in outs:
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_abandoned_copies(out)
            handle, name = tempfile.mkstemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent)
            os.close(handle)
            staged.append(Path(name))
        yield staged
        for out, path in zip(outs, staged, strict=True):
            os.chmod(path, stat.S_IMODE(out.stat().st_mode) if out.is_file() else 0o666 & ~mask)
        with signals_held():
            done: list[tuple[Path, Path | None]] = []
            try:
                for out, path in zip(outs, staged, strict=True):
                    aside = None
                    if out.exists():
                        aside = path.with_name(path.name.removesuffix(".partial") + ".old")
                        os.rename(out, aside)
                    done.append((out, aside))
                    os.rename(path, out)
            except BaseException:
                for out, aside in reversed(done):
                    if aside is not None:
                        os.replace(aside, out)
                    elif out.exists():
                        out.unlink()
                raise
        for _, aside in done:
            if aside is not None:
                aside.unlink(missing_ok=True)
    except BaseException:
        for path in staged:
            path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for a few system calls that must not be split; they arrive afterwards.

    The handlers only note the signal meanwhile (Python runs handlers in the main
    thread, whichever thread the kernel picked), and it is raised again on leaving.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; other threads' callers keep the default behaviour
        return
    arrived: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    before = {signum: signal.signal(signum, lambda signum, frame: arrived.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
        for number in dict.fromkeys(arrived):
            signal.raise_signal(number)


@contextlib.contextmanager
def stop_signals_raise(arrived: list[int] | None = None) -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise :class:`Interrupted`, SIGINT ``KeyboardInterrupt``.

    Each signal's number is also appended to ``arrived``: library code the exception passes
    through may turn it into an error of its own (transformers reports an import it cut short
    as ``ModuleNotFoundError``), and the caller still has to know the run was stopped.
    """

    def stop(signum: int, frame: object) -> None:
        if arrived is not None:
            arrived.append(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    before = {signum: signal.signal(signum, stop) for signum in caught}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
