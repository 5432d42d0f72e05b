#!/usr/bin/env bash
# Issue 15, item 4 on one GPU, from the repository root, in one call of at most 10 minutes:
#   WHEELS=pinned bash benchmarks/long_context_device.sh [benchmarks/long_context.py options]
# Default: 1b and 8b, TRL's 4-bit path and the recipe with gradient_checkpointing="offload", lengths
# going up until one fails or the time left is too short (each row says why). An 8B step at 400,000
# tokens should take about 7 minutes (attention grows with the square of the length), so the issue's
# lengths take three calls (benchmarks/NOTES.md, section 11), the first one alone:
#   --runs 8b/qlora-plugin-memory:400000
#   --runs 8b/trl-qlora:32768,65536,131072 8b/qlora-plugin-memory:131072,262144
#   --runs 1b/trl-qlora:65536,131072,262144,400000 1b/qlora-plugin-memory:131072,262144,400000,524288
#   --runs 8b/unsloth-qlora:65536,131072,262144 (WHEELS="speed unsloth": Unsloth's longest, no estimate)
# On a machine kept warm the 8B checkpoint (/tmp/qlora-long-context) is made once.
# DEADLINE (s, default 585) is the whole call's budget. Results in $OUT: long_context.json, .md, the
# plot (.png with matplotlib, else .svg), attempts/ (each attempt's row and log) and long_context.log.
# Wheels: benchmarks/fetch_wheels.sh pinned, carried as .whl/pinned.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
nvidia-smi -L
free -g | head -2
echo "wheels installed after ${SECONDS} s"
budget=$(( ${DEADLINE:-585} - SECONDS ))
python3 "$here/long_context.py" --out "$out" --deadline "$budget" "$@" 2>&1 | tee "$out/long_context.log"
exit "${PIPESTATUS[0]}"
