"""Checkpoints that are complete or absent, and a resume that skips an incomplete one.

transformers writes ``checkpoint-N`` file by file, ``trainer_state.json`` last. A
run that stops in between (a full disk, SIGKILL, SIGTERM) leaves a directory that
looks like a checkpoint: Trainer's ``resume_from_checkpoint=True`` and Axolotl's
``auto_resume_from_checkpoints`` both pick the newest one and then fail on it.

:class:`CheckpointGuard`, a ``TrainerCallback`` (the Axolotl plugin installs it;
with TRL pass ``callbacks=recipe.callbacks()``), closes both ends:

- it notes each checkpoint as the trainer starts writing it and confirms it when
  the trainer reports it saved, then adds ``qlora_recipe.json`` (what ``qlora
  merge`` needs) and a manifest of the files and their sizes; if the process
  ends before the confirmation, the half-written directory is removed at exit
  and one line says which checkpoint to resume from; SIGTERM during training ends
  the run that same way (it would otherwise kill it before any cleanup);
- when a trainer is created, before any resume picks a checkpoint, directories
  without a valid ``trainer_state.json``, or whose files differ from their
  manifest, are moved aside to ``.incomplete-checkpoint-N`` with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from qlora_plugin.build.context import PACKAGE_LOGGER, RunContext
from qlora_plugin.build.length_check import check_max_length
from qlora_plugin.core import patches
from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.fields import RECIPE_FILE
from qlora_plugin.core.files import read_json
from qlora_plugin.core.recipe import QLoRARecipe, write_recipe_file
from qlora_plugin.core.run_record import compare_record, model_format
from qlora_plugin.core.safe_io import write_text_atomically
from qlora_plugin.integrations.exit_summary import close_progress_bars
from qlora_plugin.integrations.moe_check import ExpertsCheck

MANIFEST = "qlora_checkpoint.json"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
QUARANTINE_PREFIX = ".incomplete-"
PATCH = "python-atexit-checkpoints"
_writing: dict[Path, Path] = {}  # checkpoint being written -> output dir (read at exit)


def incomplete_reason(directory: Path) -> str | None:
    """Why the checkpoint at ``directory`` cannot be resumed from, or None if it is complete."""
    state = directory / TRAINER_STATE
    if not state.is_file():
        return f"it has no {TRAINER_STATE} (the run stopped while writing it)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"its {TRAINER_STATE} is cut short"
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return None
    try:
        expected = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    for name, size in expected.items():
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


def set_aside_incomplete(output_dir: str | os.PathLike[str]) -> list[tuple[Path, Path, str]]:
    """Move every incomplete ``checkpoint-N`` of ``output_dir`` to ``.incomplete-checkpoint-N``; (from, to, why)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    moved = []
    for directory in sorted(root.iterdir(), key=_step):
        if not (directory.is_dir() and CHECKPOINT.fullmatch(directory.name)):
            continue
        reason = incomplete_reason(directory)
        if reason is None:
            continue
        target = _free_name(root / f"{QUARANTINE_PREFIX}{directory.name}")
        os.rename(directory, target)
        moved.append((directory, target, reason))
    return moved


def complete_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The complete checkpoints of ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and CHECKPOINT.fullmatch(d.name) and incomplete_reason(d) is None]
    return sorted(found, key=_step)


def write_manifest(directory: Path) -> None:
    """Record every file of a finished checkpoint with its size."""
    files = {
        os.fspath(path.relative_to(directory)): path.stat().st_size
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    write_text_atomically(directory / MANIFEST, json.dumps({"files": files}, indent=1, sort_keys=True))


class CheckpointGuard(TrainerCallback):
    """Keeps a run's checkpoints complete or absent, and resumes clear of incomplete ones (module docstring).

    ``recipe``: written beside each checkpoint; ``context``: the run, whose logger its warnings go to.
    """

    def __init__(self, recipe: QLoRARecipe | None = None, context: RunContext | None = None) -> None:
        self.recipe = recipe
        self.logger = context.logger if context is not None else logging.getLogger(PACKAGE_LOGGER)
        self._previous_sigterm: Any = None

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        check_max_length(args, kwargs.get("model"), self.logger)  # where the layer factory did not already
        if not args.should_save:
            return
        for source, target, reason in set_aside_incomplete(args.output_dir):
            self.logger.warning(
                "qlora: %s is incomplete: %s. Moved aside to %s so that a resume skips it "
                "(delete it to free its space).",
                source,
                reason,
                target.name,
            )

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step > 0:  # resumed: the checkpoint's record must describe the model that goes on
            check_resume(Path(args.output_dir) / f"checkpoint-{state.global_step}", kwargs.get("model"))
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._previous_sigterm = signal.signal(signal.SIGTERM, _stop_on_sigterm)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._expect(args, state, control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._expect(args, state, control)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        _writing.pop(directory, None)
        if not args.should_save or not directory.is_dir():
            return
        if self.recipe is not None:
            write_recipe_file(self.recipe, directory, kwargs.get("model"))
        write_manifest(directory)

    def _expect(self, args: Any, state: Any, control: Any) -> None:
        """The trainer is about to write ``checkpoint-<step>``: watch it until :meth:`on_save` confirms it."""
        if control.should_save and args.should_save:
            directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            _writing[directory] = Path(args.output_dir)
            patches.apply(PATCH, lambda _: _remove_unfinished)


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _remove_unfinished() -> None:
    """At exit: remove checkpoints the trainer began but never reported saved, and say where to resume."""
    for directory, output_dir in list(_writing.items()):
        _writing.pop(directory, None)
        if not directory.is_dir():
            continue
        shutil.rmtree(directory, ignore_errors=True)
        close_progress_bars()
        complete = complete_checkpoints(output_dir)
        resume = (
            f"resume from {complete[-1].name}"
            if complete
            else "no complete checkpoint is left: the next run starts from step 0"
        )
        print(
            f"qlora: the run stopped while writing {directory.name} (a full disk, or a signal?); the incomplete "
            f"directory was removed and {output_dir} holds only complete checkpoints: {resume} "
            "(Axolotl: auto_resume_from_checkpoints: true; TRL: trainer.train(resume_from_checkpoint=True)).",
            file=sys.stderr,
        )


def _step(path: Path) -> int:
    match = CHECKPOINT.fullmatch(path.name)
    return int(match.group(1)) if match else -1


def _free_name(path: Path) -> Path:
    candidate, number = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.{number}")
        number += 1
    return candidate


def check_resume(checkpoint: Path, model: Any, r: int | None = None) -> None:
    """Compare ``checkpoint``'s ``qlora_recipe.json`` with the model that resumes from it; one line on a difference.

    The base's 4-bit format (data type, double quantization, block size) and, given ``r``,
    the rank: resuming NF4 checkpoints over an FP4 base, or with another rank, trains another
    model than the one the checkpoints hold.
    """
    file = checkpoint / RECIPE_FILE
    if model is None or not os.path.lexists(file):
        return
    fields = read_json(file, RECIPE_FILE, f"restore it, or delete {checkpoint} to resume from an earlier checkpoint")
    if not isinstance(fields, dict):
        return
    fix = (
        f"resume with the recipe {checkpoint.name} was trained with (quant_type={fields.get('quant_type')!r}, "
        f"double_quant={fields.get('double_quant')!r}, r={fields.get('r')!r}), or start a new run in another output_dir"
    )
    loaded = model_format(model)
    if loaded is not None:
        compare_record(fields, loaded, os.fspath(file), "this run's base", fix)
    if r is not None and "r" in fields and fields["r"] != r:
        raise QLoRAConfigError("r", r, f"{file} records r={fields['r']!r}", fix)


def resume_checkpoint(cfg: Any) -> Path | None:
    """The checkpoint an Axolotl config resumes from: ``resume_from_checkpoint``, or with
    ``auto_resume_from_checkpoints`` the newest complete one in ``output_dir``; else None."""
    explicit = cfg.get("resume_from_checkpoint")
    if isinstance(explicit, str) and explicit:
        return Path(explicit)
    if cfg.get("auto_resume_from_checkpoints") and cfg.get("output_dir"):
        found = complete_checkpoints(cfg["output_dir"])
        return found[-1] if found else None
    return None


def recipe_callbacks(recipe: QLoRARecipe, context: RunContext | None = None) -> list[Any]:
    """The callbacks ``recipe.callbacks()`` returns: a :class:`CheckpointGuard` for the recipe (and its run),
    and the mixture-of-experts check (:class:`qlora_plugin.integrations.moe_check.ExpertsCheck`)."""
    return [CheckpointGuard(recipe, context), ExpertsCheck(recipe)]
