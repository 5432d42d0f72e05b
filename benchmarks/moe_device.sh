#!/usr/bin/env bash
# Issue 27's memory row on one GPU, from the repository root, in one call of at most 10 minutes:
#   bash benchmarks/moe_device.sh [benchmarks/moe_bench.py options]
# Default: a Qwen3-30B-A3B-shaped model (random init, 48 layers, 128 experts, top-8) at batch 1 x 2048,
# the plugin (experts in 4 bits, LoRA on attention and experts) and TRL's 4-bit path as a user gets it
# (experts in bf16), each in its own process: peak GiB, tok/s, or the out-of-memory error. Also:
#   --variants plugin plugin-r8 plugin-linear trl-4bit
# DEADLINE (s, default 530) is the whole call's budget. Results in $OUT: moe.json, moe.md, <variant>.log.
# Wheels: benchmarks/fetch_wheels.sh pinned, carried as .whl/pinned.
# CPU dry run (tiny shape, no wheels): BENCH_DEVICE=cpu SKIP_WHEELS=1 bash benchmarks/moe_device.sh
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
nvidia-smi -L 2>/dev/null || true
echo "wheels installed after ${SECONDS} s"
budget=$(( ${DEADLINE:-530} - SECONDS ))
python3 "$here/moe_bench.py" --out "$out" --deadline "$budget" "$@" 2>&1 | tee "$out/moe_bench.log"
exit "${PIPESTATUS[0]}"
