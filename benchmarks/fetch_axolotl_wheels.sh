#!/usr/bin/env bash
# Download (here, with network) the wheels that `axolotl train` needs on the GPU image beyond
# what it holds, into .whl/axolotl/ of the repo root; .whl/pinned (benchmarks/fetch_wheels.sh pinned)
# has bitsandbytes, trl, liger-kernel, datasets, dill, multiprocess, and nothing here repeats them.
# The set is what a LoRA/QLoRA SFT run with the plugin imports (traced, then checked in a venv
# holding only the image's packages): Axolotl, its top-level imports (pydantic, addict, fire,
# python-dotenv, evaluate, posthog, fastcore, wandb) and what those import that the image lacks.
# Install all of .whl/pinned/*.whl and .whl/axolotl/*.whl in ONE `pip install --target` call: axolotl and
# axolotl-contribs-lgpl share the axolotl/ folder, and a second --upgrade call would replace it.
# axolotl-contribs-lgpl is published as an sdist only: it is built here into a pure-Python wheel.
# wandb is imported at top level by axolotl.utils.callbacks but never started without use_wandb:
# its Go/Rust binaries (wandb/bin, 19 MB of 20) are dropped; KEEP_WANDB_BIN=1 keeps them.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
dest=.whl/axolotl
mkdir -p "$dest"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$dest" \
  axolotl==0.19.0 pydantic==2.12.5 pydantic_core==2.41.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  addict==2.4.0 fire==0.7.1 termcolor==3.3.0 python-dotenv==1.0.1 evaluate==0.4.1 fastcore==2.2.39 \
  posthog==6.7.11 backoff==2.2.1 distro==1.9.0 wandb==0.31.0 platformdirs==4.14.7 opentelemetry-api==1.45.2
if ! ls "$dest"/axolotl_contribs_lgpl-0.0.7-*.whl >/dev/null 2>&1; then
  sdist=$(mktemp -d)
  python3 -m pip download --no-deps --no-binary=:all: -d "$sdist" axolotl-contribs-lgpl==0.0.7
  python3 -m pip wheel --no-deps -w "$dest" "$sdist"/axolotl_contribs_lgpl-0.0.7.tar.gz
  rm -r "$sdist"
fi
if [ "${KEEP_WANDB_BIN:-0}" != 1 ]; then
  zip -q -d "$dest"/wandb-0.31.0-*.whl 'wandb/bin/*' || true
fi
ls -la "$dest"
du -ch "$dest"/*.whl | tail -1
