#!/usr/bin/env bash
# Download (here, with network) the wheels the GPU image lacks into .whl/ of the repo root.
# The image has torch 2.11, transformers, peft, accelerate, triton, pyarrow, pandas, xxhash,
# fsspec, httpx; it lacks these. bitsandbytes is slimmed to its CPU + CUDA 13 libraries
# (43 MB -> 7 MB) to stay far under the 64 MiB a device call may carry.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  bitsandbytes==0.50.2 trl==1.9.0 liger-kernel==0.8.1 datasets==4.8.4 dill==0.4.0 multiprocess==0.70.18
zip -q -d .whl/bitsandbytes-0.50.2-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' \
  'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*' || true
ls -la .whl
