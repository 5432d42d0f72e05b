"""Whole-or-nothing writes (core/safe_io.py) on a real file system, in the fast suite: the atomic
text write and its permissions, the destination checks, the cleanup of copies a killed process
left, and the full-disk test. The slow merge tests drive the same code through ``qlora merge``
(docs/mutation.md)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import tempfile
from pathlib import Path

import pytest

from qlora_plugin import QLoRAConfigError
from qlora_plugin.core.safe_io import (
    Interrupted,
    check_writable_destination,
    current_umask,
    directory_mode,
    give_normal_permissions,
    glob_escape,
    is_disk_full,
    remove_abandoned_copies,
    staged_directory,
    write_text_atomically,
)


@pytest.fixture
def umask_027():
    before = os.umask(0o027)
    yield 0o027
    os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_current_umask_reads_the_umask_and_leaves_it(umask_027) -> None:
    assert current_umask() == 0o027
    assert current_umask() == 0o027


def test_a_text_write_replaces_the_file_whole_with_the_umasks_mode_and_leaves_no_temporary(tmp_path, umask_027) -> None:
    target = tmp_path / "recipe.json"
    target.write_text("old")
    write_text_atomically(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert mode(target) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.json"]


def test_a_text_write_under_a_zero_umask_is_readable_and_writable_by_all_but_not_executable(
    tmp_path,
) -> None:
    before = os.umask(0)
    try:
        write_text_atomically(tmp_path / "recipe.json", "{}")
    finally:
        os.umask(before)
    assert mode(tmp_path / "recipe.json") == 0o666


def test_the_temporary_lies_beside_the_target_so_the_rename_stays_on_one_file_system() -> None:
    shm = Path("/dev/shm")
    if (
        not shm.is_dir()
        or not os.access(shm, os.W_OK)
        or shm.stat().st_dev == Path(tempfile.gettempdir()).stat().st_dev
    ):
        pytest.skip("no second writable file system beside the temporary directory")
    directory = Path(tempfile.mkdtemp(dir=shm))
    try:
        write_text_atomically(directory / "recipe.json", "text")  # a temporary in /tmp could not be renamed here
        assert (directory / "recipe.json").read_text() == "text"
        assert sorted(p.name for p in directory.iterdir()) == ["recipe.json"]
    finally:
        shutil.rmtree(directory)


def test_a_text_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path) -> None:
    target = tmp_path / "recipe.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        write_text_atomically(target, 5)  # type: ignore[arg-type]  # the write fails after the temporary exists
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.json"]


def test_a_text_write_onto_a_directory_fails_at_the_rename_and_leaves_no_temporary(
    tmp_path,
) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):
        write_text_atomically(tmp_path / "taken", "text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_destination_under_a_file_is_refused_naming_the_file(tmp_path) -> None:
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "deeper" / "merged"
    with pytest.raises(QLoRAConfigError) as error:
        check_writable_destination(out, "--out")
    assert error.value.field == "--out" and error.value.value == os.fspath(out)
    assert error.value.problem == f"lies under {tmp_path / 'a-file'}, which is a file"
    assert error.value.fix == "choose a path whose parents are directories"


def test_a_new_destination_in_a_writable_directory_is_accepted(tmp_path) -> None:
    check_writable_destination(tmp_path / "not" / "yet" / "there", "--out")
    check_writable_destination(tmp_path, "--out")  # an existing directory that is no mount point


def test_a_destination_in_a_read_only_directory_is_refused() -> None:
    locked = Path("/proc/sys")  # read-only even for root
    if not locked.is_dir() or os.access(locked, os.W_OK | os.X_OK):
        pytest.skip("no read-only directory here")
    with pytest.raises(QLoRAConfigError) as error:
        check_writable_destination(locked / "qlora" / "merged", "--out")
    assert error.value.field == "--out" and error.value.value == os.fspath(locked / "qlora" / "merged")
    assert error.value.problem == f"cannot be written: {locked} is not writable"
    assert error.value.fix == "choose a directory you can write to"


def test_a_mount_point_is_refused_as_a_destination() -> None:
    mount = Path("/proc")
    if not os.path.ismount(mount):
        pytest.skip("/proc is no mount point here")
    with pytest.raises(QLoRAConfigError) as error:
        check_writable_destination(mount, "--out")
    assert (error.value.field, error.value.value) == ("--out", "/proc")
    assert error.value.problem == "is a mount point, which cannot be replaced by the final rename"
    assert error.value.fix == "write into a new directory inside it, e.g. --out /proc/merged"


def test_a_finished_directory_keeps_the_mode_of_the_one_it_replaces_else_gets_mkdirs(tmp_path, umask_027) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    existing.chmod(0o711)
    assert directory_mode(existing) == 0o711
    assert directory_mode(tmp_path / "new") == 0o750


def test_permissions_inside_follow_the_umask_and_the_top_gets_the_mode_given(tmp_path, umask_027) -> None:
    top = tmp_path / "top"
    (top / "sub").mkdir(parents=True)
    (top / "sub").chmod(0o700)
    (top / "sub" / "weights").write_text("")
    (top / "sub" / "weights").chmod(0o600)
    (top / "config").write_text("")
    (top / "config").chmod(0o600)
    give_normal_permissions(top, 0o701)
    assert mode(top) == 0o701
    assert mode(top / "sub") == 0o750
    assert mode(top / "sub" / "weights") == 0o640 and mode(top / "config") == 0o640


def dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_permissions_under_a_zero_umask_are_mkdirs_and_opens_defaults(tmp_path) -> None:
    top = tmp_path / "top"
    top.mkdir()
    (top / "weights").write_text("")
    before = os.umask(0)
    try:
        give_normal_permissions(top, 0o755)
    finally:
        os.umask(before)
    assert mode(top / "weights") == 0o666


def test_looking_for_a_copys_process_never_signals_it(tmp_path) -> None:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".merged.{process.pid}.abcd.partial").mkdir()
        assert remove_abandoned_copies(tmp_path / "merged") == []
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=1)  # still running: not even SIGHUP
    finally:
        process.kill()
        process.wait()


def test_copies_a_killed_process_left_are_removed_and_others_kept(tmp_path) -> None:
    out = tmp_path / "merged"
    dead, alive = dead_pid(), os.getpid()
    left = [
        tmp_path / f".merged.{dead}.x1y2.partial",
        tmp_path / f".merged.{dead}.x1y2.old",
    ]
    kept = [
        tmp_path / f".merged.{alive}.abcd.partial",  # another merge still running
        tmp_path / f".merged.{dead}.abcd.other",  # not a name staged_directory makes
        tmp_path / f".merged.{dead}.partial",
        tmp_path / f".merged.x{dead}.abcd.partial",
        tmp_path / f".merged2.{dead}.abcd.partial",  # another destination's copy
    ]
    for path in left + kept:
        path.mkdir()
        (path / "file").write_text("")
    assert sorted(remove_abandoned_copies(out)) == sorted(left)
    assert all(not path.exists() for path in left) and all(path.is_dir() for path in kept)


def test_a_process_of_another_user_counts_as_alive(tmp_path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root may signal every process")
    (tmp_path / ".merged.1.abcd.partial").mkdir()  # pid 1 runs as root
    assert remove_abandoned_copies(tmp_path / "merged") == []


def test_glob_characters_in_a_name_are_matched_literally(tmp_path) -> None:
    assert glob_escape("a*b?c[d]e") == "a[*]b[?]c[[]d]e"
    assert glob_escape("X-merged.1") == "X-merged.1"  # only glob characters change
    dead = dead_pid()
    out = tmp_path / "run[1]*"
    ours, theirs = (
        tmp_path / f".run[1]*.{dead}.ab.partial",
        tmp_path / f".run1x.{dead}.ab.partial",
    )
    ours.mkdir()
    theirs.mkdir()
    assert remove_abandoned_copies(out) == [ours] and theirs.is_dir()


def test_staged_directory_cleans_up_what_a_killed_process_left(tmp_path) -> None:
    dead = dead_pid()
    (tmp_path / f".merged.{dead}.zz.partial").mkdir()
    with staged_directory(tmp_path / "merged") as staging:
        (staging / "file").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT])
def test_the_full_disk_errors_are_recognised_directly_and_as_a_cause(code) -> None:
    assert is_disk_full(OSError(code, os.strerror(code)))
    try:
        try:
            raise OSError(code, "")
        except OSError as inner:
            raise RuntimeError("while saving") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    try:
        try:
            raise OSError(code, "")
        except OSError:
            raise RuntimeError("while saving") from None  # the context is still kept
    except RuntimeError as outer:
        assert is_disk_full(outer)


@pytest.mark.parametrize(
    "text",
    [
        "No space left on device",
        "File too large",
        "Disk quota exceeded",
        "StorageFull",
        "FileTooLarge",
    ],
)
def test_a_full_disk_is_recognised_by_the_message_of_a_rust_writer(text) -> None:
    assert is_disk_full(RuntimeError(f"safetensors: I/O error: {text} (os error 28)"))


def test_other_errors_are_no_full_disk_and_a_cycle_in_the_chain_ends() -> None:
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    first, second = ValueError("a"), ValueError("b")
    first.__cause__, second.__cause__ = second, first
    assert not is_disk_full(first)
    second.__context__, second.__cause__ = OSError(errno.ENOSPC, ""), None
    assert is_disk_full(first)


def test_interrupted_carries_the_signal_and_its_name() -> None:
    stop = Interrupted(signal.SIGTERM)
    assert stop.signum == signal.SIGTERM and str(stop) == "SIGTERM"
    assert not isinstance(stop, Exception)  # passes `except Exception` on its way to the cleanup
