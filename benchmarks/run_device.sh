#!/usr/bin/env bash
# Run the QLoRA benchmark on a CUDA machine, from the repository root.
#   bash benchmarks/run_device.sh [bench_qlora.py "all" options...]
# Installs the wheels in .whl/ (if any) into /tmp/site first. Results go to $OUT if set,
# else benchmarks/results/run-<time>/. A staged copy (this script beside a qlora_plugin/ package and
# a tests/ folder, e.g. under .bench/) runs the staged package.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$PWD/benchmarks/results/run-$(date +%Y%m%d-%H%M%S)}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d "$here/qlora_plugin" ]; then  # staged package beside this script (e.g. under .bench/)
  export PYTHONPATH=$here:$PYTHONPATH
  tests=$here/tests
elif [ -d "$here/kernels" ]; then
  mkdir -p /tmp/pkg/qlora_plugin && : >/tmp/pkg/qlora_plugin/__init__.py
  rm -rf /tmp/pkg/qlora_plugin/kernels && cp -r "$here/kernels" /tmp/pkg/qlora_plugin/kernels
  export PYTHONPATH=/tmp/pkg:$PYTHONPATH
  tests=$here/tests
else
  export PYTHONPATH=$PWD/src:$PYTHONPATH
  tests=$PWD/tests
fi
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv,noheader
python3 "$here/bench_qlora.py" all --out "$out" --tests-dir "$tests" "$@"
