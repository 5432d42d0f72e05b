#!/usr/bin/env bash
# Where the 1B step goes under SFTTrainer + recipe, against the bare loop (benchmarks/NOTES.md, run 4).
#   bash benchmarks/probe_trainer_1b.sh        (on the CUDA machine, from the repository root)
# Each row: 10 timed steps after 3 warm-up steps; "--profile" rows also profile one step and record
# the host time of each trainer phase. Results: $out/probe.json, $out/profile-*.txt, $out/log.txt.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
models=/dev/shm/qlora-models
log=$out/log.txt
bench() { echo "+ $*" >>"$log"; timeout 300 python3 "$here/bench_qlora.py" "$@" --model-dir $models --json "$out/probe.json" \
            --steps 10 --warmup 3 >>"$log" 2>&1; echo "$* rc=$?"; tail -1 "$log"; }
python3 "$here/bench_qlora.py" make-model --shape 1b --dir $models >>"$log" 2>&1 || { tail -20 "$log"; exit 1; }
rows=${PROBE_ROWS:-all}
if [ "$rows" = all ]; then  # run 4, call 1: separate the causes
  bench run --shape 1b --variant qlora-plugin --tag trainer-d05-log1 --profile "$out/profile-trainer-d05.txt"
  bench run --shape 1b --variant qlora-plugin --tag trainer-d0-log1 --dropout 0 --profile "$out/profile-trainer-d0.txt"
  bench run --shape 1b --variant qlora-plugin --tag trainer-d0-log10 --dropout 0 --logging-steps 10
  bench run --shape 1b --variant qlora-plugin --tag trainer-d05-log10 --logging-steps 10
  bench run --shape 1b --variant kernels-direct --tag bare-d0 --profile "$out/profile-bare-d0.txt"
  bench run --shape 1b --variant kernels-direct --tag bare-d05 --dropout 0.05
  bench run --shape 1b --variant qlora-plugin-default --tag trainer-default-full-recompute
elif [ "$rows" = graphs ]; then  # run 5: main before graphs (.bench/old) against this tree, one machine
  echo "+ pytest test_kernels_cuda.py -k decoder_graphs" >>"$log"
  timeout 120 python3 -m pytest -q -p no:cacheprovider "$tests/test_kernels_cuda.py" -k decoder_graphs >>"$log" 2>&1; echo "graph tests rc=$?"; tail -2 "$log"
  old() { PYTHONPATH=$PWD/.bench/old:$PYTHONPATH bench "$@"; }
  nographs='{"cuda_graphs": false}'
  for i in 1 2; do
    old run --shape 1b --variant qlora-plugin --tag before-graphs-d0 --dropout 0
    bench run --shape 1b --variant qlora-plugin --tag graphs-d0 --dropout 0
  done
  bench run --shape 1b --variant qlora-plugin --tag graphs-off-d0 --dropout 0 --plugin "$nographs"
  bench run --shape 1b --variant kernels-direct --tag bare-d0
  python3 "$here/bench_qlora.py" make-model --shape 8b --dir $models >>"$log" 2>&1
  bench8() { echo "+ $*" >>"$log"; timeout 200 python3 "$here/bench_qlora.py" "$@" --model-dir $models --json "$out/probe.json" \
               --steps 5 --warmup 2 >>"$log" 2>&1; echo "$* rc=$?"; tail -1 "$log"; }
  bench8 run --shape 8b --variant qlora-plugin --tag graphs-d0 --dropout 0
  bench8 run --shape 8b --variant qlora-plugin --tag graphs-off-d0 --dropout 0 --plugin "$nographs"
else  # run 4, call 2: after the host-time changes, each trainer row twice (the host's noise)
  for i in 1 2; do
    bench run --shape 1b --variant qlora-plugin --tag trainer-d05 --profile "$out/profile-trainer-d05-$i.txt"
    bench run --shape 1b --variant qlora-plugin --tag trainer-d0 --dropout 0 --profile "$out/profile-trainer-d0-$i.txt"
  done
  bench run --shape 1b --variant kernels-direct --tag bare-d0
  bench run --shape 1b --variant kernels-direct --tag bare-d05 --dropout 0.05
  bench run --shape 1b --variant qlora-plugin-default --tag trainer-default-full-recompute
  echo "+ pytest test_kernels_cuda.py" >>"$log"
  timeout 240 python3 -m pytest -q -p no:cacheprovider "$tests/test_kernels_cuda.py" >>"$log" 2>&1; echo "kernel tests rc=$?"; tail -3 "$log"
fi
python3 "$here/bench_qlora.py" table "$out/probe.json" | tee "$out/probe.md"
