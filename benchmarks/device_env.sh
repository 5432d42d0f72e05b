# Sourced by the device scripts: install the carried wheels, pick the package to run, set the env.
# Sets $here (this folder), $out (results: $OUT, else benchmarks/results/run-<time>) and $tests.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${OUT:-$PWD/benchmarks/results/run-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
# WHEELS: one or more sets of benchmarks/fetch_wheels.sh, e.g. "pinned deepspeed" (default pinned)
# .whl/axolotl, when carried, comes first. pip refuses two wheels of one distribution, so a
# distribution already taken from an earlier folder is skipped in a later one.
wheel_files=()
declare -A taken=()
for folder in $(compgen -G ".whl/axolotl") ${WHEELS:-pinned}; do
  folder=.whl/${folder#.whl/}
  [ -d "$folder" ] || echo "WHEELS: no folder $folder (benchmarks/fetch_wheels.sh ${folder#.whl/})" >&2
  for file in "$folder"/*.whl; do
    [ -f "$file" ] || continue
    name=$(basename "$file"); name=${name%%-*}; name=${name,,}
    [ -n "${taken[$name]:-}" ] && continue
    taken[$name]=1; wheel_files+=("$file")
  done
done
if [ -z "${SKIP_WHEELS:-}" ] && [ ${#wheel_files[@]} -gt 0 ]; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${wheel_files[@]}" || exit 1
fi
if [ -d /tmp/site ]; then  # installed now, or by an earlier script of the same call (SKIP_WHEELS=1)
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d "$here/qlora_plugin" ]; then  # staged package beside this script (e.g. under .bench/)
  export PYTHONPATH=$here${PYTHONPATH:+:$PYTHONPATH}
  tests=$here/tests
elif [ -d "$here/kernels" ]; then
  mkdir -p /tmp/pkg/qlora_plugin && : >/tmp/pkg/qlora_plugin/__init__.py
  rm -rf /tmp/pkg/qlora_plugin/kernels && cp -r "$here/kernels" /tmp/pkg/qlora_plugin/kernels
  export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}
  tests=$here/tests
else
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
  tests=$PWD/tests
fi
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null || true
