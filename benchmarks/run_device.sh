#!/usr/bin/env bash
# Run the QLoRA benchmark on a CUDA machine, from the repository root.
#   bash benchmarks/run_device.sh [bench_qlora.py "all" options...]
# Installs the wheels in .whl/ (if any) into /tmp/site first. Results go to $OUT if set,
# else benchmarks/results/run-<time>/. A staged copy (this script beside a qlora_plugin/ package and
# a tests/ folder, e.g. under .bench/) runs the staged package.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
python3 "$here/bench_qlora.py" all --out "$out" --tests-dir "$tests" "$@"
