#!/usr/bin/env bash
# Where the 1B step goes under SFTTrainer + recipe, against the bare loop (benchmarks/NOTES.md, run 4).
#   bash benchmarks/probe_trainer_1b.sh        (on the CUDA machine, from the repository root)
# Each row: 10 timed steps after 3 warm-up steps; "--profile" rows also profile one step and record
# the host time of each trainer phase. Trainer rows log every 10 steps (TRL's default) unless a row says
# otherwise; before run 7 the default was every step. Results: $out/probe.json, $out/profile-*.txt, $out/log.txt.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
models=/dev/shm/qlora-models
log=$out/log.txt
bench() { echo "+ $*" >>"$log"; timeout 300 python3 "$here/bench_qlora.py" "$@" --model-dir $models --json "$out/probe.json" \
            --steps 10 --warmup 3 >>"$log" 2>&1; echo "$* rc=$?"; tail -1 "$log"; }
bench8() { echo "+ $*" >>"$log"; timeout 200 python3 "$here/bench_qlora.py" "$@" --model-dir $models --json "$out/probe.json" \
             --steps 5 --warmup 2 >>"$log" 2>&1; echo "$* rc=$?"; tail -1 "$log"; }
capture_cases() {  # graph_dropout_capture.py cases, one process each, into $out/dropout_capture.txt
  for case in "$@"; do
    echo "+ graph_dropout_capture.py $case" >>"$out/dropout_capture.txt"
    timeout 120 python3 "$here/graph_dropout_capture.py" "$case" >>"$out/dropout_capture.txt" 2>&1
    grep -a "^$case " "$out/dropout_capture.txt" | tail -1
  done
}
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
  bench8 run --shape 8b --variant qlora-plugin --tag graphs-d0 --dropout 0
  bench8 run --shape 8b --variant qlora-plugin --tag graphs-off-d0 --dropout 0 --plugin "$nographs"
elif [ "$rows" = sync ]; then  # run 6: the trainer's read-backs (NOTES section 9)
  nonan='{"logging_nan_inf_filter": false}'
  quiet='{"logging_nan_inf_filter": false, "logging_steps": 1000}'
  for i in 1 2; do
    bench run --shape 1b --variant qlora-plugin --tag graphs-d0 --dropout 0
    bench run --shape 1b --variant qlora-plugin --tag graphs-d0-nonan --dropout 0 --trainer-args "$nonan"
  done
  bench run --shape 1b --variant qlora-plugin --tag graphs-d0-nonan-nometrics --dropout 0 --trainer-args "$nonan" --trl-metrics off
  bench run --shape 1b --variant qlora-plugin --tag graphs-d0-nonan-nometrics-log1000 --dropout 0 --trainer-args "$quiet" --trl-metrics off
  bench run --shape 1b --variant qlora-plugin --tag d05 --dropout 0.05
  bench run --shape 1b --variant qlora-plugin --tag d05-nonan --dropout 0.05 --trainer-args "$nonan"
  bench run --shape 1b --variant kernels-direct --tag bare-d0
  bench run --shape 1b --variant kernels-direct --tag bare-d0-graphs --plugin '{"cuda_graphs": true}'
  bench run --shape 1b --variant qlora-plugin --tag timeline-graphs-d0 --dropout 0 --timeline "$out/timeline-graphs-d0.json"
  bench run --shape 1b --variant qlora-plugin --tag timeline-graphs-d0-nonan --dropout 0 --trainer-args "$nonan" \
    --timeline "$out/timeline-graphs-d0-nonan.json"
  capture_cases lora02 two-callables one-callable two-calls-pool tiny-1-layer tiny-2-layers tiny-2-layers-per-layer-capture
elif [ "$rows" = confirm ]; then  # run 6, call 2: the recipe with the filter off, against it on (NOTES section 9)
  filter='{"logging_nan_inf_filter": true}'
  for i in 1 2 3; do
    bench run --shape 1b --variant qlora-plugin --tag recipe-d0 --dropout 0
    bench run --shape 1b --variant qlora-plugin --tag recipe-d0-filter-on --dropout 0 --trainer-args "$filter"
  done
  bench run --shape 1b --variant qlora-plugin --tag recipe-d0-workers2 --dropout 0 --trainer-args '{"dataloader_num_workers": 2}'
  bench run --shape 1b --variant qlora-plugin --tag recipe-d05 --dropout 0.05
  bench run --shape 1b --variant kernels-direct --tag bare-d0-graphs --plugin '{"cuda_graphs": true}'
  capture_cases tiny-1-layer-p0 tiny-1-layer-syncdebug tiny-1-layer-capture-first tiny-1-layer-bernoulli
elif [ "$rows" = dropout-graphs ]; then  # run 6, call 3: graphs with the recipe's default dropout
  echo "+ pytest test_kernels_cuda.py -k graphs" >>"$log"
  timeout 150 python3 -m pytest -q -p no:cacheprovider "$tests/test_kernels_cuda.py" -k graphs >>"$log" 2>&1; echo "graph tests rc=$?"; tail -2 "$log"
  for i in 1 2; do
    bench run --shape 1b --variant qlora-plugin --tag recipe-d05-graphs
  done
  export QLORA_CUDA_GRAPHS=0; bench run --shape 1b --variant qlora-plugin --tag recipe-d05-graphs-off; unset QLORA_CUDA_GRAPHS
  bench run --shape 1b --variant qlora-plugin --tag recipe-d0-graphs --dropout 0
  bench run --shape 1b --variant kernels-direct --tag bare-d05-graphs --dropout 0.05 --plugin '{"cuda_graphs": true}'
  python3 "$here/bench_qlora.py" make-model --shape 8b --dir $models >>"$log" 2>&1
  bench8 run --shape 8b --variant qlora-plugin --tag recipe-d05-graphs
elif [ "$rows" = suite ]; then  # run 6, call 4: the whole CUDA suite after the change, and the 1B rows again
  echo "+ pytest test_kernels_cuda.py" >>"$log"
  timeout 200 python3 -m pytest -q -p no:cacheprovider "$tests/test_kernels_cuda.py" >"$out/cuda-tests.txt" 2>&1; echo "kernel tests rc=$?"; tail -2 "$out/cuda-tests.txt"
  bench run --shape 1b --variant qlora-plugin --tag recipe-d05-graphs
  bench run --shape 1b --variant qlora-plugin --tag recipe-d0-graphs --dropout 0
elif [ "$rows" = fused-dropout ]; then  # run 7, call 1: LoRA dropout drawn in Triton kernels, mask kept as bits
  echo "+ pytest test_kernels_cuda.py -k 'dropout or fused_lora or graphs'" >>"$log"
  timeout 200 python3 -m pytest -q -p no:cacheprovider "$tests/test_kernels_cuda.py" -k "dropout or fused_lora or graphs" \
    >"$out/cuda-tests.txt" 2>&1; echo "kernel tests rc=$?"; tail -2 "$out/cuda-tests.txt"
  bench run --shape 1b --variant qlora-plugin --tag recipe-d05-graphs-bits
  bench run --shape 1b --variant qlora-plugin --tag recipe-d05-graphs-torch-dropout --plugin '{"triton_dropout": false}'
  bench run --shape 1b --variant qlora-plugin --tag recipe-d0-graphs --dropout 0
  bench run --shape 1b --variant qlora-plugin --tag recipe-d05-graphs-bits
  python3 "$here/bench_qlora.py" make-model --shape 8b --dir $models >>"$log" 2>&1
  bench8 run --shape 8b --variant qlora-plugin --tag recipe-d05-graphs-bits
elif [ "$rows" = logging ]; then  # run 7, call 4: the default recipe, logging every step against TRL's default 10
  for i in 1 2; do
    bench run --shape 1b --variant qlora-plugin --tag recipe-d05-bits-log1 --logging-steps 1
    bench run --shape 1b --variant qlora-plugin --tag recipe-d05-bits-log10 --logging-steps 10
  done
  bench run --shape 1b --variant qlora-plugin --tag timeline-d05-bits-log1 --logging-steps 1 --timeline "$out/timeline-d05-bits-log1.json"
elif [ "$rows" = non-blocking ]; then  # run 7, call 5: the batch's copy to the GPU without a stream sync
  nb='{"accelerator_config": {"non_blocking": true}}'
  for i in 1 2; do
    bench run --shape 1b --variant qlora-plugin --tag recipe-d05-log10 --logging-steps 10
    bench run --shape 1b --variant qlora-plugin --tag recipe-d05-log10-nonblocking --logging-steps 10 --trainer-args "$nb"
  done
  bench run --shape 1b --variant qlora-plugin --tag recipe-d05-log1-nonblocking --logging-steps 1 --trainer-args "$nb"
  bench run --shape 1b --variant qlora-plugin --tag timeline-d05-log10-nonblocking --logging-steps 10 --trainer-args "$nb" \
    --timeline "$out/timeline-d05-log10-nonblocking.json"
elif [ "$rows" = recipe-nonblocking ]; then  # run 7, call 6: the recipe now sets non_blocking itself; the CUDA suite
  bench run --shape 1b --variant qlora-plugin --tag recipe-d05-log10 --logging-steps 10
  bench run --shape 1b --variant qlora-plugin --tag recipe-d05-log1 --logging-steps 1
  bench run --shape 1b --variant qlora-plugin --tag recipe-d05-log10 --logging-steps 10
  echo "+ pytest test_kernels_cuda.py" >>"$log"
  timeout 170 python3 -m pytest -q -p no:cacheprovider "$tests/test_kernels_cuda.py" >"$out/cuda-tests.txt" 2>&1; echo "kernel tests rc=$?"; tail -2 "$out/cuda-tests.txt"
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
