"""When the fast path's MLPs run tiled, and in slices of how many tokens (no torch import: the estimate reads these).

Slices of 8,192 tokens: at the 8B shape one slice's backward holds about 1 GB of MLP
intermediates (4 x 8,192 x 14,336 x 2 bytes) and the GEMMs stay large enough to run at full
speed. Tiling starts at 32,768 tokens a step (four slices): below that the intermediates are a
few GB at most, and the extra MLP forward would cost speed for little memory.
"""

from __future__ import annotations

TILED_MLP_ROWS = 8192
TILED_MLP_MIN_TOKENS = 32768
