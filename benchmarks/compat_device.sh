#!/usr/bin/env bash
# Issue 12's GPU runs, on the CUDA machine from the repository root, one or more stages per call:
#   WHEELS=pinned bash benchmarks/compat_device.sh packing cuda-tests
#   WHEELS=newest bash benchmarks/compat_device.sh matrix
# Stages: packing (benchmarks/packing_bench.py on the 1B shape), cuda-tests (tests/test_kernels_cuda.py),
# matrix (benchmarks/compat_matrix.py, TRL and transformers cells), axolotl (its Axolotl cells; needs
# .whl/axolotl from fetch_axolotl_wheels.sh). Wheels: benchmarks/fetch_wheels.sh $WHEELS. Results in $OUT.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export PATH=/tmp/site/bin:$PATH
set_name=${WHEELS:-pinned}
models=/dev/shm/qlora-models; [ -d /dev/shm ] || models=/tmp/qlora-models
status=0
for stage in "$@"; do
  echo "== $stage ($set_name) $(date +%T)"
  case "$stage" in
    packing)
      python3 "$here/bench_qlora.py" make-model --shape 1b --dir "$models" >/tmp/make-model.log 2>&1 || { tail /tmp/make-model.log; exit 1; }
      python3 "$here/packing_bench.py" --model-dir "$models" --shape 1b --out "$out" ${PACKING_ARGS:-} || status=1 ;;
    cuda-tests)
      python3 -m pytest -q -p no:cacheprovider "$tests/test_kernels_cuda.py" >"$out/cuda-tests.txt" 2>&1 || status=1
      tail -5 "$out/cuda-tests.txt" ;;
    matrix)
      python3 "$here/compat_matrix.py" --out "$out" --label "$set_name" --skip axolotl ${MATRIX_ARGS:-} >"$out/matrix.log" 2>&1 || status=1
      grep -E "^[a-z0-9-]+: (fast|fallback|crash)|cells in" "$out/matrix.log" | cut -c1-220 ;;
    axolotl)
      python3 "$here/compat_matrix.py" --out "$out" --label "$set_name" --only ${AXOLOTL_CELLS:-axolotl} >"$out/matrix-axolotl.log" 2>&1 || status=1
      grep -E "^axolotl|cells in" "$out/matrix-axolotl.log" | cut -c1-300 ;;
    *) echo "unknown stage $stage"; status=2 ;;
  esac
done
exit $status
