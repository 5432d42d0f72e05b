"""README's install lines, run as written into fresh environments: from a path to the clone, and a wheel
built with ``python -m build``.

Each fresh environment gets this one's packages through a ``.pth`` line, so the lines run with
``--no-deps`` (the dependencies resolve in ``make install`` already) and without build isolation
(no download). What they prove: the package builds from the clone, installs into another
environment, and its ``qlora`` command and the ``.pth`` that lets ``axolotl train`` find
``accelerate`` are there.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLONE = "/path/to/qlora-plugin"
# What a clone holds that building the package reads.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "src")


def install_commands() -> list[str]:
    """The commands of README's Install code block (comments dropped, ``&&`` chains split)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            commands += [part.strip() for part in line.split("&&")]
    return commands


def environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def fresh_venv(path: Path) -> Path:
    """A new environment without pip or setuptools of its own, that sees this one's packages after its own."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    own = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, env=environment(),
    ).stdout.strip()  # fmt: skip
    found = [entry for entry in sys.path if Path(entry).name in ("site-packages", "dist-packages")]
    (Path(own) / "_dependencies.pth").write_text("\n".join(found) + "\n")
    return python


def run(command: list[str | Path], cwd: Path) -> str:
    done = subprocess.run(
        [str(part) for part in command], cwd=cwd, capture_output=True, text=True, env=environment(), timeout=600
    )
    assert done.returncode == 0, f"{shlex.join(map(str, command))}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def assert_installed(python: Path) -> None:
    """The package comes from the environment itself (not this checkout), with its command and its .pth."""
    where = run([python, "-c", "import qlora_plugin, sysconfig; print(qlora_plugin.__file__); "
                 "print(sysconfig.get_paths()['purelib'])"], REPO).split()  # fmt: skip
    module, purelib = Path(where[0]), Path(where[1])
    assert module.is_relative_to(purelib), module
    assert (purelib / "qlora_plugin_axolotl.pth").is_file()
    assert "ready to train" in run([python.parent / "qlora", "check", "configs/qlora.yml"], REPO)


def test_readme_names_a_path_install_and_a_wheel_built_with_build() -> None:
    commands = install_commands()
    assert any(c.startswith("pip install") and CLONE in c and ".whl" not in c for c in commands), commands
    assert "python -m build --wheel" in commands, commands
    assert any(c.startswith("pip install") and c.endswith('.whl[axolotl]"') for c in commands), commands
    assert not any(c.split()[:3] == ["pip", "install", "qlora-plugin"] for c in commands), "not on PyPI"


@pytest.mark.slow
def test_the_readme_install_lines_work_in_fresh_environments(tmp_path) -> None:
    pytest.importorskip("build", reason="the dev extra's `build` runs README's wheel line")
    clone = tmp_path / "qlora-plugin"
    clone.mkdir()
    for name in BUILD_INPUTS:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, clone / name, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
        else:
            shutil.copy2(source, clone / name)
    cwd, installed = tmp_path, 0
    for command in install_commands():
        words = shlex.split(command.replace(CLONE, str(clone)))
        if words[0] == "cd":
            cwd = Path(words[1])
        elif words[:3] == ["python", "-m", "build"]:
            run([sys.executable, "-m", "build", *words[3:], "--no-isolation"], cwd)
        elif words[:2] == ["pip", "install"] and words[2] not in ("torch", "build"):
            python = fresh_venv(tmp_path / f"venv{installed}")
            pip = [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-build-isolation"]
            run([*pip, *words[2:]], cwd)
            assert_installed(python)
            installed += 1
    assert installed == 2


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
