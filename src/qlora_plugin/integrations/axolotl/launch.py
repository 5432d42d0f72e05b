"""``axolotl train`` called by path, from an environment that is not activated.

Axolotl's ``train`` execs ``accelerate launch`` as found on ``PATH``, before any plugin
loads: from ``.venv/bin/axolotl`` with the environment not activated there is none (a
``FileNotFoundError``), or another environment's. ``qlora_plugin_axolotl.pth``, which the
package installs into site-packages, calls :func:`put_scripts_first` when an interpreter
starts as the ``axolotl`` command; nothing else runs at start-up.
"""

from __future__ import annotations

import os
import shutil
import sys


def put_scripts_first() -> None:
    """Put this interpreter's scripts directory first on ``PATH`` if its ``accelerate`` is not what ``PATH`` finds."""
    scripts = os.path.dirname(sys.executable)
    own = shutil.which("accelerate", path=scripts)
    if own is not None and shutil.which("accelerate") != own:
        os.environ["PATH"] = os.pathsep.join(filter(None, [scripts, os.environ.get("PATH")]))
