"""Running the real ``qlora`` command in a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def qlora_command() -> list[str]:
    """The installed ``qlora`` console script beside this Python, else ``python -m qlora_plugin.commands.main``."""
    script = Path(sys.executable).parent / "qlora"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "qlora_plugin.commands.main"]


def run_qlora(*args: Any, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``qlora ARGS`` with this checkout's package first on the path."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        COLUMNS="160",
    )
    return subprocess.run(
        [*qlora_command(), *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def run_json(*args: Any) -> Any:
    """Run ``qlora ARGS --json``; fail with its stderr if it fails."""
    result = run_qlora(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def axolotl_env() -> dict[str, str]:
    """The environment README gives ``axolotl train`` (no hub, no tracking), with this Python's scripts
    directory taken off ``PATH``: the environment is called by path, not activated, and Axolotl still
    finds its ``accelerate`` (through the package's ``qlora_plugin_axolotl.pth``)."""
    scripts = os.fspath(Path(sys.executable).parent)
    path = os.pathsep.join(entry for entry in os.environ.get("PATH", "").split(os.pathsep) if entry != scripts)
    return {
        **os.environ,
        "PATH": path,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "AXOLOTL_DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def axolotl_command() -> str:
    """The ``axolotl`` console script beside this Python."""
    return str(Path(sys.executable).parent / "axolotl")


def run_repo_job(config: str, out: Path, *, timeout: int) -> subprocess.CompletedProcess[str]:
    """``axolotl train CONFIG`` from the repository root as the README runs it, its output dir and
    prepared data moved under ``out`` (the adapter in ``out/adapter``); stdout and stderr together."""
    command = [
        axolotl_command(),
        "train",
        config,
        "--output-dir",
        str(out / "adapter"),
        "--dataset-prepared-path",
        str(out / "prepared"),
    ]
    return subprocess.run(
        command,
        cwd=REPO,
        env=axolotl_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
