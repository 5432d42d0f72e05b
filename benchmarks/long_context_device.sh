#!/usr/bin/env bash
# Issue 15, item 4 on one GPU, from the repository root, in one call of at most 10 minutes:
#   WHEELS=pinned bash benchmarks/long_context_device.sh [benchmarks/long_context.py options]
# Default: 1b and 8b, TRL's 4-bit path and the recipe with gradient_checkpointing="offload", lengths
# going up until one fails or the time left is too short (each row says why). An 8B step at 400,000
# tokens takes about 7 minutes (attention grows with the square of the length), so that length needs
# a call of its own:  --runs 8b/qlora-plugin-memory:400000
# DEADLINE (s, default 570) is the whole call's budget. Results in $OUT: long_context.json, .md, the
# plot (.png with matplotlib, else .svg), attempts/ (each attempt's row and log) and long_context.log.
# Wheels: benchmarks/fetch_wheels.sh pinned, carried as .whl/pinned.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
nvidia-smi -L
free -g | head -2
echo "wheels installed after ${SECONDS} s"
budget=$(( ${DEADLINE:-570} - SECONDS ))
python3 "$here/long_context.py" --out "$out" --deadline "$budget" "$@" 2>&1 | tee "$out/long_context.log"
exit "${PIPESTATUS[0]}"
