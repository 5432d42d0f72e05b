#!/usr/bin/env bash
# Issue 16 part 2 on a CUDA machine, from the repository root, once every .device-pack/callN
# group has been carried (scripts/pack_for_device.py): join and check the parts, then run
# benchmarks/quality.py on them. Results go to $OUT/quality if set, else benchmarks/results/run-<time>/quality.
#   bash benchmarks/run_quality.sh [quality.py run options, e.g. --steps 100 --seeds 0]
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
data=/tmp/qlora-real
python3 scripts/pack_for_device.py unpack --pack .device-pack --dest "$data" || exit 1
python3 "$here/quality.py" run --cache "$data" --out "$out/quality" "$@" 2>&1 | tee "$out/quality.log"
