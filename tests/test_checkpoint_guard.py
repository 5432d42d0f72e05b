"""The checkpoint guard (integrations/checkpoints.py) without training: the completeness rule, the
quarantine of incomplete checkpoints, the manifest, and the callback driven by transformers' own
TrainingArguments / TrainerState / TrainerControl. The slow TRL and Axolotl runs check the same code
inside real trainers; these pin its details in the fast suite (docs/mutation.md)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
from pathlib import Path

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from qlora_plugin.core import patches
from qlora_plugin.integrations import checkpoints
from qlora_plugin.integrations.checkpoints import (
    MANIFEST,
    TRAINER_STATE,
    CheckpointGuard,
    complete_checkpoints,
    incomplete_reason,
    recipe_callbacks,
    set_aside_incomplete,
    write_manifest,
)


def checkpoint(root: Path, step: int, *, state: str | None = "{}", files: dict[str, bytes] | None = None) -> Path:
    """A ``checkpoint-<step>`` directory with ``files`` and, unless None, a trainer_state.json holding ``state``."""
    directory = root / f"checkpoint-{step}"
    directory.mkdir(parents=True)
    for name, data in (files or {"model.safetensors": b"weights"}).items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    if state is not None:
        (directory / TRAINER_STATE).write_text(state)
    return directory


def trainer_args(tmp_path: Path, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, **kwargs)


@dataclasses.dataclass
class OtherProcessArgs(TrainingArguments):
    """The arguments as a process other than the main one sees them (Trainer reads ``should_save``)."""

    @property
    def should_save(self) -> bool:
        return False


def other_process_args(tmp_path: Path) -> TrainingArguments:
    return OtherProcessArgs(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)


@pytest.fixture(autouse=True)
def nothing_left_in_writing():
    """Each test starts and ends with no checkpoint being watched (the exit hook reads the same table)."""
    checkpoints._writing.clear()
    yield
    checkpoints._writing.clear()


# -- the completeness rule -------------------------------------------------------------------------


def test_a_checkpoint_without_trainer_state_is_incomplete(tmp_path) -> None:
    assert incomplete_reason(checkpoint(tmp_path, 1, state=None)) == (
        "it has no trainer_state.json (the run stopped while writing it)"
    )


def test_a_checkpoint_whose_trainer_state_is_cut_short_is_incomplete(tmp_path) -> None:
    assert incomplete_reason(checkpoint(tmp_path, 1, state='{"global_st')) == "its trainer_state.json is cut short"


def test_a_checkpoint_with_a_whole_state_and_no_manifest_is_complete(tmp_path) -> None:
    assert incomplete_reason(checkpoint(tmp_path, 1)) is None


@pytest.mark.parametrize("manifest", ["{not json", '{"no_files": {}}', "[1, 2]"], ids=["json", "key", "type"])
def test_an_unreadable_manifest_makes_the_checkpoint_incomplete(tmp_path, manifest) -> None:
    directory = checkpoint(tmp_path, 1)
    (directory / MANIFEST).write_text(manifest)
    assert incomplete_reason(directory) == "its qlora_checkpoint.json is unreadable"


def test_the_manifest_lists_every_file_with_its_size_and_a_copy_that_differs_is_incomplete(tmp_path) -> None:
    directory = checkpoint(tmp_path, 1, files={"optimizer.pt": b"12345", "sub/part.bin": b"ab"})
    write_manifest(directory)
    listed = json.loads((directory / MANIFEST).read_text())
    assert listed == {"files": {"optimizer.pt": 5, os.path.join("sub", "part.bin"): 2, TRAINER_STATE: 2}}
    assert incomplete_reason(directory) is None

    (directory / "optimizer.pt").write_bytes(b"123")
    assert incomplete_reason(directory) == "optimizer.pt has 3 bytes, 5 were written"
    (directory / "optimizer.pt").unlink()
    assert incomplete_reason(directory) == "optimizer.pt is missing"
    write_manifest(directory)  # written again: the manifest never lists itself, nor a file that is gone
    assert json.loads((directory / MANIFEST).read_text())["files"] == {
        os.path.join("sub", "part.bin"): 2,
        TRAINER_STATE: 2,
    }


def test_a_file_replaced_by_a_directory_is_missing(tmp_path) -> None:
    directory = checkpoint(tmp_path, 1, files={"optimizer.pt": b"12345"})
    write_manifest(directory)
    (directory / "optimizer.pt").unlink()
    (directory / "optimizer.pt").mkdir()
    assert incomplete_reason(directory) == "optimizer.pt is missing"


# -- quarantine and the list of complete checkpoints ---------------------------------------------------


def test_incomplete_checkpoints_are_moved_aside_oldest_first_and_complete_ones_stay(tmp_path) -> None:
    root = tmp_path / "out"
    complete = [checkpoint(root, step) for step in (2, 10)]
    broken_late = checkpoint(root, 12, state=None)
    broken_early = checkpoint(root, 9, state="{")
    (root / "checkpoint-7").write_text("a file, not a checkpoint")
    other = checkpoint(root, 3, state=None).rename(root / "checkpoint-3-copy")

    moved = set_aside_incomplete(root)

    assert moved == [
        (broken_early, root / ".incomplete-checkpoint-9", "its trainer_state.json is cut short"),
        (broken_late, root / ".incomplete-checkpoint-12", incomplete_reason(root / ".incomplete-checkpoint-12")),
    ]
    assert moved[1][2] == "it has no trainer_state.json (the run stopped while writing it)"
    assert all(directory.is_dir() for directory in complete) and other.is_dir() and (root / "checkpoint-7").is_file()
    assert not broken_early.exists() and (root / ".incomplete-checkpoint-9" / TRAINER_STATE).read_text() == "{"
    assert complete_checkpoints(root) == complete  # numeric order: 2 before 10


def test_a_second_quarantine_of_the_same_step_gets_a_free_name(tmp_path) -> None:
    root = tmp_path / "out"
    for expected in (".incomplete-checkpoint-4", ".incomplete-checkpoint-4.1", ".incomplete-checkpoint-4.2"):
        checkpoint(root, 4, state=None)
        assert [target.name for _, target, _ in set_aside_incomplete(root)] == [expected]


def test_a_missing_output_dir_has_nothing_to_set_aside_or_resume(tmp_path) -> None:
    assert set_aside_incomplete(tmp_path / "absent") == []
    assert complete_checkpoints(tmp_path / "absent") == []
    (tmp_path / "file").write_text("")
    assert set_aside_incomplete(tmp_path / "file") == [] and complete_checkpoints(tmp_path / "file") == []


def test_complete_checkpoints_leave_out_incomplete_ones_and_other_names(tmp_path) -> None:
    root = tmp_path / "out"
    good = [checkpoint(root, step) for step in (1, 100, 20)]
    checkpoint(root, 5, state=None)
    checkpoint(root, 6).rename(root / "checkpoint-6-old")
    (root / "checkpoint-8").write_text("")
    assert complete_checkpoints(root) == [good[0], good[2], good[1]]


# -- the callback ----------------------------------------------------------------------------------


def test_the_guard_sets_incomplete_checkpoints_aside_when_the_trainer_starts(tmp_path, caplog) -> None:
    from qlora_plugin.build.context import make_context
    from qlora_plugin.core.recipe import qlora_recipe

    recipe = qlora_recipe()
    run = make_context(recipe, logger_name="qlora_tests.routed")  # as the Axolotl plugin routes a run's messages
    args = trainer_args(tmp_path)
    broken = checkpoint(Path(args.output_dir), 3, state=None)
    with caplog.at_level(logging.WARNING):
        CheckpointGuard(recipe, run).on_init_end(args, TrainerState(), TrainerControl())
    assert not broken.exists() and (Path(args.output_dir) / ".incomplete-checkpoint-3").is_dir()
    assert [(record.name, record.getMessage()) for record in caplog.records] == [
        (
            "qlora_tests.routed",
            f"qlora: {broken} is incomplete: it has no trainer_state.json (the run stopped while writing it). "
            "Moved aside to .incomplete-checkpoint-3 so that a resume skips it (delete it to free its space).",
        )
    ]


def test_a_process_that_does_not_save_leaves_the_checkpoints_alone(tmp_path) -> None:
    args = other_process_args(tmp_path)
    broken = checkpoint(Path(args.output_dir), 3, state=None)
    CheckpointGuard().on_init_end(args, TrainerState(), TrainerControl())
    assert broken.is_dir()


def test_a_save_is_watched_from_the_step_that_asks_for_it_until_the_trainer_reports_it(tmp_path) -> None:
    args = trainer_args(tmp_path)
    guard = CheckpointGuard()
    state = TrainerState(global_step=4)
    directory = Path(args.output_dir) / "checkpoint-4"

    guard.on_step_end(args, state, TrainerControl(should_save=False))
    assert checkpoints._writing == {}
    guard.on_step_end(args, state, TrainerControl(should_save=True))
    assert checkpoints._writing == {directory: Path(args.output_dir)}
    assert checkpoints.PATCH in patches.applied()  # the exit handler, through the patch registry

    checkpoints._writing.clear()
    guard.on_epoch_end(args, state, TrainerControl(should_save=True))
    assert checkpoints._writing == {directory: Path(args.output_dir)}

    checkpoint(Path(args.output_dir), 4, files={"adapter_model.safetensors": b"abc"})
    guard.on_save(args, state, TrainerControl())
    assert checkpoints._writing == {}
    assert json.loads((directory / MANIFEST).read_text())["files"]["adapter_model.safetensors"] == 3
    assert not (directory / "qlora_recipe.json").exists()  # no recipe given


def test_a_process_that_does_not_save_watches_nothing(tmp_path) -> None:
    args = other_process_args(tmp_path)
    CheckpointGuard().on_step_end(args, TrainerState(global_step=2), TrainerControl(should_save=True))
    assert checkpoints._writing == {}


def test_on_save_adds_the_recipe_and_the_manifest_only_where_the_checkpoint_was_written(tmp_path) -> None:
    from qlora_plugin.core.fields import RECIPE_FILE
    from qlora_plugin.core.recipe import qlora_recipe

    args = trainer_args(tmp_path)
    guard = recipe_callbacks(qlora_recipe("paper"))[0]
    assert isinstance(guard, CheckpointGuard) and guard.recipe.preset == "paper"

    guard.on_save(args, TrainerState(global_step=1), TrainerControl())  # no checkpoint-1: nothing is created
    assert not (Path(args.output_dir) / "checkpoint-1").exists()

    directory = checkpoint(Path(args.output_dir), 2)
    guard.on_save(args, TrainerState(global_step=2), TrainerControl())
    assert json.loads((directory / RECIPE_FILE).read_text())["r"] == 64
    assert RECIPE_FILE in json.loads((directory / MANIFEST).read_text())["files"]

    other = checkpoint(Path(args.output_dir), 3)
    guard.on_save(other_process_args(tmp_path), TrainerState(global_step=3), TrainerControl())
    assert not (other / MANIFEST).exists() and not (other / RECIPE_FILE).exists()


def test_sigterm_ends_training_as_an_exit_and_the_handler_goes_back_afterwards(tmp_path) -> None:
    args, guard = trainer_args(tmp_path), CheckpointGuard()
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a plain process (a test runner may hold it)
    try:
        guard.on_train_begin(args, TrainerState(), TrainerControl())
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler) and handler is not signal.SIG_DFL
        with pytest.raises(SystemExit) as stop:
            handler(signal.SIGTERM, None)
        assert stop.value.code == 128 + signal.SIGTERM
        guard.on_train_end(args, TrainerState(), TrainerControl())
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and guard._previous_sigterm is None
        guard.on_train_end(args, TrainerState(), TrainerControl())  # a second end changes nothing
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_training_end_without_a_beginning_leaves_sigterm_alone(tmp_path) -> None:
    def theirs(signum, frame) -> None:
        pass

    before = signal.signal(signal.SIGTERM, theirs)
    try:
        CheckpointGuard().on_train_end(trainer_args(tmp_path), TrainerState(), TrainerControl())
        assert signal.getsignal(signal.SIGTERM) is theirs
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_sigterm_handler_someone_else_installed_is_left_in_place(tmp_path) -> None:
    def theirs(signum, frame) -> None:
        pass

    args, guard = trainer_args(tmp_path), CheckpointGuard()
    before = signal.signal(signal.SIGTERM, theirs)
    try:
        guard.on_train_begin(args, TrainerState(), TrainerControl())
        assert signal.getsignal(signal.SIGTERM) is theirs
        guard.on_train_end(args, TrainerState(), TrainerControl())
        assert signal.getsignal(signal.SIGTERM) is theirs
    finally:
        signal.signal(signal.SIGTERM, before)


# -- the exit check --------------------------------------------------------------------------------


def test_at_exit_an_unconfirmed_checkpoint_is_removed_and_the_newest_complete_one_named(tmp_path, capsys) -> None:
    root = tmp_path / "out"
    for step in (2, 10, 11):
        checkpoint(root, step)
    half = checkpoint(root, 12, state=None)
    gone = root / "checkpoint-14"  # asked for, never created
    checkpoints._writing.update({gone: root, half: root})

    checkpoints._remove_unfinished()

    assert not half.exists() and checkpoints._writing == {}
    err = capsys.readouterr().err
    assert err.count("qlora: the run stopped while writing") == 1
    assert "the run stopped while writing checkpoint-12 (a full disk, or a signal?)" in err
    assert f"{root} holds only complete checkpoints: resume from checkpoint-11 (Axolotl:" in err


def test_at_exit_with_no_complete_checkpoint_the_next_run_starts_over(tmp_path, capsys) -> None:
    root = tmp_path / "out"
    half = checkpoint(root, 3, state=None)
    checkpoints._writing[half] = root
    checkpoints._remove_unfinished()
    assert not root.joinpath("checkpoint-3").exists()
    assert (
        "only complete checkpoints: no complete checkpoint is left: the next run starts from step 0 (Axolotl:"
        in capsys.readouterr().err
    )
