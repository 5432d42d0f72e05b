#!/usr/bin/env bash
# Issue 22 item 6 on one GPU, from the repository root, in one call of at most 10 minutes:
#   WHEELS=pinned bash benchmarks/one_gpu_70b.sh [benchmarks/one_gpu_70b.py options: --rows full:4096 offload:65536]
# The Llama-3.1-70B shape built straight into 4 bits on the GPU (random weights, ~4 s), batch 1: tok/s at
# 4,096 tokens (full and offloaded recompute), then longer rows with offload until one fails or the time
# is spent. DEADLINE (s, default 560) is the whole call's budget. Results in $OUT: one_gpu_70b.json, .md,
# and each row's .json and .log. Wheels: benchmarks/fetch_wheels.sh pinned, carried as .whl/pinned.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
nvidia-smi -L
free -g | head -2
budget=$(( ${DEADLINE:-560} - SECONDS ))
python3 "$here/one_gpu_70b.py" --out "$out" --deadline "$budget" "$@" 2>&1 | tee "$out/one_gpu_70b.log"
exit "${PIPESTATUS[0]}"
