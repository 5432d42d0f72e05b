"""Installing the package: the ``.pth`` that lets ``axolotl train``, called by path, find ``accelerate``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_axolotl_called_by_path_finds_this_environments_accelerate(tmp_path) -> None:
    """Axolotl's ``train`` execs ``accelerate`` from ``PATH``; called as ``.venv/bin/axolotl`` from a shell where
    the environment is not activated, the installed ``.pth`` puts the environment's scripts first."""
    from cli_helpers import axolotl_env

    scripts = Path(sys.executable).parent
    assert (scripts / "accelerate").is_file(), "accelerate's script is not beside this Python"
    axolotl = tmp_path / "axolotl"  # an interpreter started as a command named `axolotl`, like the real one
    axolotl.write_text(f"#!{sys.executable}\nimport shutil\nprint(shutil.which('accelerate'))\n")
    axolotl.chmod(0o755)
    env = axolotl_env()
    assert os.fspath(scripts) not in env["PATH"].split(os.pathsep)
    found = subprocess.run([axolotl], capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert found == os.fspath(scripts / "accelerate")
    other = tmp_path / "not-axolotl"  # any other command starts as before
    other.write_text(axolotl.read_text())
    other.chmod(0o755)
    assert subprocess.run([other], capture_output=True, text=True, env=env, check=True).stdout.strip() != found
