"""``qlora merge`` under faults: real SIGINT, SIGTERM and SIGKILL mid-merge, a full disk (a file-size limit and a
full tmpfs), a rename that fails at the very end, and the permissions of what it writes. Whatever
happens, ``--out`` is the complete new model or exactly what it was, and nothing else is left."""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
import torch
from bad_inputs import mount_tmpfs, snapshot, stderr_lines, unmount
from cli_helpers import SRC, qlora_command

from qlora_plugin.commands.main import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter with non-zero B over the 4-bit tiny Llama, saved with its qlora_recipe.json."""
    from peft import get_peft_model

    from qlora_plugin import qlora_recipe

    recipe = qlora_recipe(model=tiny_model_dir)
    model = get_peft_model(recipe.load_model(tiny_model_dir), recipe)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    directory = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(directory)
    return directory


@pytest.fixture
def previous(tmp_path) -> Path:
    """An existing --out with the user's file in it, mode 0750: what --force may replace only when it succeeds."""
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("the previous model")
    out.chmod(0o750)
    return out


def environment() -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )


def assert_untouched(tmp_path: Path, previous: Path, before: dict) -> None:
    """--out holds exactly what it held, and no temporary directory is left beside it."""
    assert snapshot(tmp_path) == before
    assert (previous / "keep.txt").read_text() == "the previous model"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["SIGTERM", "SIGINT", "SIGKILL"]
)
def test_a_signal_mid_merge_leaves_out_as_it_was(adapter_dir, tmp_path, previous, signum, capsys) -> None:
    before = snapshot(tmp_path)
    process = subprocess.Popen(
        [*qlora_command(), "merge", str(adapter_dir), "--out", str(previous), "--force"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
    )
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".merged.*.partial")):  # the merge has begun writing its temporary copy
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    if signum == signal.SIGKILL:  # nothing runs in a killed process: the next merge removes what it left
        assert process.returncode == -signum
        assert (previous / "keep.txt").read_text() == "the previous model"
        assert main(["merge", str(adapter_dir), "--out", str(tmp_path / "other")]) == 0, capsys.readouterr().err
        assert main(["merge", str(adapter_dir), "--out", str(previous), "--force"]) == 0, capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "other"]
        return
    assert process.returncode == 128 + signum, stderr
    lines = stderr_lines(stderr)
    assert (
        lines[-1] == f"qlora merge: stopped by {signal.Signals(signum).name}; nothing was written "
        "(temporary files removed)"
    ), stderr
    assert "Traceback" not in stderr
    assert_untouched(tmp_path, previous, before)


def limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))  # bytes; the merged weights need more


def test_a_file_size_limit_mid_merge_leaves_out_as_it_was(adapter_dir, tmp_path, previous) -> None:
    before = snapshot(tmp_path)
    done = subprocess.run(
        [*qlora_command(), "merge", str(adapter_dir), "--out", str(previous), "--force"],
        check=False,
        capture_output=True,
        text=True,
        env=environment(),
        preexec_fn=limit_file_size,
        timeout=600,
    )
    assert done.returncode == 1, done.stderr
    last = stderr_lines(done.stderr)[-1]
    assert last.startswith("qlora merge: failed: the disk is full, or a file-size limit was reached"), done.stderr
    assert "nothing was written" in last and "Fix: " in last
    assert_untouched(tmp_path, previous, before)


def test_a_full_disk_mid_merge_leaves_out_as_it_was(adapter_dir, tmp_path, capsys) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    if not mount_tmpfs(disk, "64k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        (disk / "merged").mkdir()
        (disk / "merged" / "keep.txt").write_text("the previous model")
        before = snapshot(disk)
        assert main(["merge", str(adapter_dir), "--out", str(disk / "merged"), "--force"]) == 1
        assert "the disk is full" in capsys.readouterr().err
        assert snapshot(disk) == before
    finally:
        unmount(disk)


def test_a_rename_that_fails_at_the_end_restores_out_and_leaves_nothing(tmp_path) -> None:
    """The issue's case: --out a mount point, so the rename that moves it aside fails (EBUSY) after the work."""
    from qlora_plugin.core.safe_io import staged_directory

    out = tmp_path / "mnt"
    out.mkdir()
    if not mount_tmpfs(out):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        (out / "keep.txt").write_text("mine")
        before = snapshot(tmp_path)
        with pytest.raises(OSError, match="busy"), staged_directory(out) as staging:
            (staging / "model.safetensors").write_bytes(b"weights")
        assert snapshot(tmp_path) == before
    finally:
        unmount(out)


def test_merged_directories_get_the_umasks_mode_and_force_keeps_the_existing_one(adapter_dir, tmp_path, capsys) -> None:
    fresh = tmp_path / "fresh"
    before = os.umask(0o027)
    try:
        assert main(["merge", str(adapter_dir), "--out", str(fresh)]) == 0, capsys.readouterr().err
    finally:
        os.umask(before)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o750  # mkdir under umask 027, not tempfile's 0700
    assert {stat.S_IMODE(p.stat().st_mode) for p in fresh.iterdir()} == {0o640}
    fresh.chmod(0o755)
    (fresh / "extra.txt").write_text("replaced by --force")
    before = os.umask(0o077)
    try:
        assert main(["merge", str(adapter_dir), "--out", str(fresh), "--force"]) == 0, capsys.readouterr().err
    finally:
        os.umask(before)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o755  # --force keeps the mode of the directory it replaces
    assert not (fresh / "extra.txt").exists() and (fresh / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh"]


def test_a_signal_turned_into_another_error_by_library_code_still_reads_as_stopped(monkeypatch, capsys) -> None:
    """transformers reports an import that SIGTERM cut short as ModuleNotFoundError (seen once in CI)."""
    from qlora_plugin.commands import main as command
    from qlora_plugin.core.safe_io import Interrupted

    def run(_args) -> int:
        try:
            signal.raise_signal(signal.SIGTERM)
        except Interrupted as cut_short:  # what a lazy import does with any failure of its own
            raise ModuleNotFoundError("Could not import module 'LlamaConfig'") from cut_short
        return 0

    monkeypatch.setattr(command, "run", run)
    assert command.main(["presets"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qlora presets: stopped by SIGTERM; nothing was written (temporary files removed)"]
