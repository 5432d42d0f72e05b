#!/usr/bin/env bash
# Issue 17 on a machine with two GPUs, from the repository root:
#   WHEELS=pinned bash benchmarks/multigpu_device.sh [benchmarks/multigpu.py options]
# One GPU, DDP and FSDP2 on the 8B shape (benchmarks/multigpu.py); results in $OUT.
# Wheels: benchmarks/fetch_wheels.sh pinned, carried as .whl/pinned.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export PATH=/tmp/site/bin:$PATH
nvidia-smi -L
python3 "$here/multigpu.py" --out "$out" "$@" 2>&1 | tee "$out/multigpu.log"
