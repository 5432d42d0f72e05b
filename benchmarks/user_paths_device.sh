#!/usr/bin/env bash
# The paths users take, in one device call (issue 22): TRL's 4-bit path, Unsloth and the plugin's rows.
#   WHEELS="speed unsloth" bash benchmarks/user_paths_device.sh [user_paths.py options: --shapes 8b --rows ...]
# .whl/speed: the pinned set without transformers and gguf (the image's transformers 5.17 serves; Unsloth
# 2026.10.9 allows up to 5.17.0); .whl/unsloth: benchmarks/fetch_wheels.sh unsloth. Results in $OUT.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
python3 "$here/user_paths.py" --out "$out" "$@"
