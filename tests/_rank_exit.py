"""How the 2-process test jobs end: leave the process group, then exit without interpreter teardown.

gloo keeps worker threads and finished work objects (holding tensors) alive until the process
group is destroyed; if any of them is still alive while the interpreter finalizes, the process
can abort with "terminate called without an active exception" after its result was written.
A job calls this once its result file is closed.
"""

from __future__ import annotations

import os
import sys


def exit_rank(code: int = 0) -> None:
    """Destroy the default process group if one is up, flush the streams and end the process with ``code``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
