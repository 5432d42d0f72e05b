"""Install ``src/qlora_plugin_axolotl.pth`` into site-packages, in wheels and editable installs alike.

The metadata lives in pyproject.toml; this file only adds the ``.pth`` (see
``qlora_plugin.integrations.axolotl.launch`` for what it does and why).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "qlora_plugin_axolotl.pth"
SOURCE = Path(__file__).resolve().parent / "src" / PTH


class BuildPyWithPth(build_py):
    """build_py, plus the ``.pth`` at the top of the build (so at the top of the wheel)."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.copy_file(os.fspath(SOURCE), os.path.join(self.build_lib, PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, os.path.join(self.build_lib, PTH)]


class EditableWheelWithPth(editable_wheel):
    """editable_wheel, plus the ``.pth`` beside the one that points at ``src/``."""

    def _select_strategy(self, *args: Any, **kwargs: Any) -> Any:
        return _WithPth(super()._select_strategy(*args, **kwargs))


class _WithPth:
    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy

    def __enter__(self) -> _WithPth:
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc: object) -> Any:
        return self.strategy.__exit__(*exc)

    def __call__(self, wheel: Any, files: list[str], mapping: dict[str, str]) -> None:
        self.strategy(wheel, files, mapping)
        wheel.writestr(PTH, SOURCE.read_bytes())


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
