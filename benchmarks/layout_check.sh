#!/usr/bin/env bash
# Issue 14's check that moving the package into layers changed no behaviour: the same benchmark row
# (bench_qlora.py run, 1B shape, qlora-plugin-default: the README's TRL snippet) with the package
# before the move (staged under .bench/old/: its src/qlora_plugin, benchmarks/*.py and tests/) and
# after it, alternated twice on one machine. Needs .whl/pinned. Results: $OUT/layout-{old,new}.json.
#   git worktree add /tmp/old 6a63c32 && mkdir -p .bench/old && cp -r /tmp/old/src/qlora_plugin \
#     /tmp/old/benchmarks/*.py /tmp/old/benchmarks/device_env.sh /tmp/old/tests .bench/old/
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
models=/dev/shm/qlora-models; [ -d /dev/shm ] || models=/tmp/qlora-models
python3 "$here/bench_qlora.py" make-model --shape 1b --dir "$models" >/tmp/make-model.log 2>&1 || { tail /tmp/make-model.log; exit 1; }
row() {  # $1: old | new
  if [ "$1" = old ]; then
    (export PYTHONPATH=$PWD/.bench/old:/tmp/site; cd .bench/old && python3 bench_qlora.py run --shape 1b \
      --variant qlora-plugin-default --model-dir "$models" --json "$out/layout-old.json" --steps 20 --tag old)
  else
    python3 "$here/bench_qlora.py" run --shape 1b --variant qlora-plugin-default --model-dir "$models" \
      --json "$out/layout-new.json" --steps 20 --tag new
  fi
}
for round in 1 2; do row old; row new; done 2>&1 | grep -E '^\{' | tee "$out/layout.txt"
