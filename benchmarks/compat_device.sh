#!/usr/bin/env bash
# Issue 12's GPU runs, on the CUDA machine from the repository root, one or more stages per call:
#   WHEELS=pinned bash benchmarks/compat_device.sh packing cuda-tests
#   WHEELS=newest bash benchmarks/compat_device.sh matrix
#   FLOOR_CELLS="sft-own-config-dft family-qwen2" bash benchmarks/compat_device.sh floor matrix-fp32
# Stages: packing (benchmarks/packing_bench.py on the 1B shape), cuda-tests (tests/test_kernels_cuda.py),
# matrix (benchmarks/compat_matrix.py, TRL and transformers cells), axolotl (its Axolotl cells; needs
# .whl/axolotl from fetch_axolotl_wheels.sh), matrix-fp32 (the matrix in float32: the maths without bf16
# rounding; in $out/fp32), floor (bf16, FLOOR_CELLS only, with TRL's path also run from a nudged start:
# its own drift; in $out/floor). STAGE_TIMEOUT (s) caps each stage. Wheels: benchmarks/fetch_wheels.sh
# $WHEELS. Results in $OUT.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export PATH=/tmp/site/bin:$PATH
set_name=${WHEELS:-pinned}
models=/dev/shm/qlora-models; [ -d /dev/shm ] || models=/tmp/qlora-models
status=0
limit=${STAGE_TIMEOUT:-3600}
for stage in "$@"; do
  echo "== $stage ($set_name) $(date +%T)"
  case "$stage" in
    packing)
      python3 "$here/bench_qlora.py" make-model --shape 1b --dir "$models" >/tmp/make-model.log 2>&1 || { tail /tmp/make-model.log; exit 1; }
      python3 "$here/packing_bench.py" --model-dir "$models" --shape 1b --out "$out" ${PACKING_ARGS:-} || status=1 ;;
    cuda-tests)
      timeout "$limit" python3 -m pytest -q -p no:cacheprovider "$tests/test_kernels_cuda.py" >"$out/cuda-tests.txt" 2>&1 || status=1
      tail -5 "$out/cuda-tests.txt" ;;
    matrix)
      timeout "$limit" python3 "$here/compat_matrix.py" --out "$out" --label "$set_name" --skip axolotl ${MATRIX_ARGS:-} \
        >"$out/matrix.log" 2>&1 || status=1
      grep -E "^[a-z0-9-]+: (fast|fallback|crash)|cells in" "$out/matrix.log" | cut -c1-220 ;;
    matrix-fp32)
      mkdir -p "$out/fp32"
      timeout "$limit" python3 "$here/compat_matrix.py" --out "$out/fp32" --label "$set_name-fp32" --skip axolotl \
        --compute-dtype float32 ${MATRIX_ARGS:-} >"$out/fp32/matrix.log" 2>&1 || status=1
      grep -E "^[a-z0-9-]+: (fast|fallback|crash)|cells in" "$out/fp32/matrix.log" | cut -c1-220 ;;
    floor)
      mkdir -p "$out/floor"
      timeout "$limit" python3 "$here/compat_matrix.py" --out "$out/floor" --label "$set_name" --noise-floor \
        --only ${FLOOR_CELLS:?set FLOOR_CELLS} >"$out/floor/matrix.log" 2>&1 || status=1
      grep -E "^[a-z0-9-]+: (fast|fallback|crash)|cells in" "$out/floor/matrix.log" | cut -c1-220 ;;
    axolotl)
      timeout "$limit" python3 "$here/compat_matrix.py" --out "$out" --label "$set_name" --only ${AXOLOTL_CELLS:-axolotl} ${MATRIX_ARGS:-} >"$out/matrix-axolotl.log" 2>&1 || status=1
      grep -E "^axolotl|cells in" "$out/matrix-axolotl.log" | cut -c1-300 ;;
    *) echo "unknown stage $stage"; status=2 ;;
  esac
done
exit $status
