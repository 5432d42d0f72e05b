#!/usr/bin/env bash
# Download (here, with network) the wheels the GPU image lacks, for one package set, into .whl/SET/:
#   bash benchmarks/fetch_wheels.sh pinned   # what Axolotl 0.19 pins: transformers 5.16.1, TRL 1.9.0, PEFT 0.20.0
#                                            # (+ gguf 0.19.0: scripts/prepare_real_job.py converts the real model there)
#   bash benchmarks/fetch_wheels.sh newest   # the newest releases: transformers 5.24.0, TRL 1.16.0, PEFT 0.21.2
# datasets stays 4.8.4 in both sets (5.x needs a newer pyarrow than the image has).
# The image has torch 2.11, transformers 5.17, accelerate 1.15, triton, pyarrow, pandas, xxhash, fsspec and
# httpx. bitsandbytes is slimmed to its CPU + CUDA 13 libraries (43 MB -> 7 MB) to stay far under the
# 64 MiB a device call may carry. benchmarks/device_env.sh installs .whl/$WHEELS (default pinned).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
set_name=${1:-pinned}
case "$set_name" in
  pinned) packages="transformers==5.16.1 trl==1.9.0 peft==0.20.0 liger-kernel==0.8.1 datasets==4.8.4 dill==0.4.0 multiprocess==0.70.18 gguf==0.19.0" ;;
  newest) packages="transformers==5.24.0 trl==1.16.0 peft==0.21.2 liger-kernel==0.8.5 datasets==4.8.4 dill==0.4.0 multiprocess==0.70.18" ;;
  *) echo "unknown set $set_name (pinned | newest)" >&2; exit 2 ;;
esac
dest=.whl/$set_name
mkdir -p "$dest"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$dest" bitsandbytes==0.50.2 $packages
zip -q -d "$dest"/bitsandbytes-0.50.2-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' \
  'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*' || true
du -ch "$dest"/*.whl | tail -1
