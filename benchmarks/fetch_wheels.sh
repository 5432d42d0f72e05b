#!/usr/bin/env bash
# Download (here, with network) the wheels the GPU image lacks, for one package set, into .whl/SET/:
#   bash benchmarks/fetch_wheels.sh pinned   # what Axolotl 0.19 pins: transformers 5.16.1, TRL 1.9.0, PEFT 0.20.0
#                                            # (+ gguf 0.19.0: scripts/prepare_real_job.py converts the real model there)
#   bash benchmarks/fetch_wheels.sh newest   # the newest releases: transformers 5.25.0, TRL 1.16.0, PEFT 0.21.2
#   bash benchmarks/fetch_wheels.sh speed    # the pinned set less transformers and gguf: the image's transformers
#                                            # 5.17 serves (Unsloth 2026.10.9 allows up to 5.17.0)
#   bash benchmarks/fetch_wheels.sh speed-newest  # TRL 1.16.0 and PEFT 0.21.2 over the image's transformers:
#                                            # the fast path in place of TRL 1.15+'s fused LM head
#   bash benchmarks/fetch_wheels.sh unsloth  # Unsloth 2026.10.9 and what the image lacks for it (~13 MB:
#                                            # its wheel without the 'studio' web app), beside speed
#   bash benchmarks/fetch_wheels.sh deepspeed  # DeepSpeed 0.19.8 and what it needs beside the image, installed on
#                                            # top of another set: WHEELS="pinned deepspeed" (about 5 MB)
# datasets stays 4.8.4 in both sets (5.x needs a newer pyarrow than the image has).
# The image has torch 2.11, transformers 5.17, accelerate 1.15, triton, pyarrow, pandas, xxhash, fsspec and
# httpx. bitsandbytes is slimmed to its CPU + CUDA 13 libraries (43 MB -> 7 MB) to stay far under the
# 64 MiB a device call may carry. benchmarks/device_env.sh installs .whl/$WHEELS (default pinned).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
set_name=${1:-pinned}
case "$set_name" in
  pinned) packages="transformers==5.16.1 trl==1.9.0 peft==0.20.0 liger-kernel==0.8.1 datasets==4.8.4 dill==0.4.0 multiprocess==0.70.18 gguf==0.19.0" ;;
  speed) packages="trl==1.9.0 peft==0.20.0 liger-kernel==0.8.1 datasets==4.8.4 dill==0.4.0 multiprocess==0.70.18" ;;
  unsloth) ;;
  speed-newest) packages="trl==1.16.0 peft==0.21.2 liger-kernel==0.8.5 datasets==4.8.4 dill==0.4.0 multiprocess==0.70.18" ;;
  newest) packages="transformers==5.25.0 trl==1.16.0 peft==0.21.2 liger-kernel==0.8.5 datasets==4.8.4 dill==0.4.0 multiprocess==0.70.18" ;;
  deepspeed) ;;
  *) echo "unknown set $set_name (pinned | speed | speed-newest | unsloth | newest | deepspeed)" >&2; exit 2 ;;
esac
dest=.whl/$set_name
mkdir -p "$dest"
grep -qx '/.whl/' "$(git rev-parse --git-path info/exclude)" 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
if [ "$set_name" = unsloth ]; then
  rm -f "$dest"/*.whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$dest" \
    unsloth==2026.10.9 unsloth_zoo==2026.10.9 tyro==1.0.17 docstring-parser==0.18.0 shtab==1.13.0 \
    typeguard==4.6.1 cut-cross-entropy==25.1.1 msgspec==0.23.0 json5==0.17.3 hf-transfer==0.1.9 \
    torchao==0.18.0 structlog==26.1.0 nest-asyncio==1.6.0
  zip -q -d "$dest"/unsloth-2026.10.9-*.whl 'studio/*' || true  # its web app: 75 MB of the 88
  du -ch "$dest"/*.whl | tail -1
  exit 0
fi
if [ "$set_name" = deepspeed ]; then
  # PyPI has only DeepSpeed's sdist. DS_BUILD_OPS=0 builds it into a pure-Python wheel (its ops compile on
  # first use; ZeRO-3 with the trainer's optimizer and no offload uses none). Built in pip's isolated
  # environment, without torch: the wheel records no torch or CUDA version, and no op is pre-built.
  rm -rf "$dest"/*.whl
  src=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary=:all: -d "$src" deepspeed==0.19.8
  DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$dest" "$src"/deepspeed-0.19.8.tar.gz
  rm -rf "$src"
  # DeepSpeed's requirements the GPU image lacks (hjson, pydantic and its own), and the small ones it has
  # (msgpack, ninja, py-cpuinfo), so the set does not depend on the image's list; einops, numpy, packaging,
  # psutil, torch and tqdm are the image's.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any -d "$dest" \
    hjson==3.1.0 pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.2 \
    typing-extensions==4.15.0 msgpack==1.1.2 ninja==1.13.0 py-cpuinfo==9.0.0
  du -ch "$dest"/*.whl | tail -1
  exit 0
fi
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$dest" bitsandbytes==0.50.2 $packages
zip -q -d "$dest"/bitsandbytes-0.50.2-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' \
  'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*' || true
du -ch "$dest"/*.whl | tail -1
