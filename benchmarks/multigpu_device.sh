#!/usr/bin/env bash
# Issue 17 on a machine with two GPUs, from the repository root, in one call of at most 10 minutes:
#   WHEELS=pinned bash benchmarks/multigpu_device.sh [8b] [70b] [benchmarks/multigpu.py options]
# Stages run in the order given (default: 8b 70b): 8b = one GPU, DDP and FSDP2 on the 8B shape
# (about 5 minutes with its checkpoint), 70b = FSDP2 on the 70B shape built in place on each
# rank (about 2-3 minutes). Results in $OUT: multigpu.json, multigpu.md, variants.log, multigpu.log.
# DEADLINE (s, default 570) is the whole call's budget: later variants are cut or skipped to fit.
# Wheels: benchmarks/fetch_wheels.sh pinned, carried as .whl/pinned. DeepSpeed ZeRO-3 (only where named):
#   WHEELS="pinned deepspeed" bash benchmarks/multigpu_device.sh 8b --variants deepspeed-zero3-2gpu fsdp2-2gpu
# carrying .whl/pinned and .whl/deepspeed (benchmarks/fetch_wheels.sh deepspeed).
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export PATH=/tmp/site/bin:$PATH
nvidia-smi -L
echo "wheels installed after ${SECONDS} s"
budget=$(( ${DEADLINE:-570} - SECONDS ))
python3 "$here/multigpu.py" --out "$out" --deadline "$budget" "$@" 2>&1 | tee "$out/multigpu.log"
exit "${PIPESTATUS[0]}"
