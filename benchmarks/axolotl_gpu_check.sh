#!/usr/bin/env bash
# Issue #3's GPU check, on the CUDA machine from the repository root:
#   bash benchmarks/axolotl_gpu_check.sh
# Needs .whl/ and .whl/axolotl/ (benchmarks/fetch_wheels.sh, benchmarks/fetch_axolotl_wheels.sh).
# Builds a random-init Llama-3.2-1B-shaped model (tokenizer: examples/assets/tiny-llama's) and 64
# synthetic rows of 2,000 tokens, runs `axolotl train benchmarks/configs/axolotl-1b-kernels.yml`
# (plugin + Axolotl's LoRA kernels) and keeps the log and the tokens/s and memory lines in $out.
# CHECK_SHAPE=tiny BENCH_DEVICE=cpu SKIP_WHEELS=1 runs the same steps on a CPU (kernels off there) as a
# dry run; CHECK_OVERRIDES='{"sequence_len": 64}' replaces top-level keys of the config.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
shape=${CHECK_SHAPE:-1b}
models=/dev/shm/qlora-models; [ -d /dev/shm ] || models=/tmp/qlora-models
work=/tmp/axolotl-gpu-check
rm -rf "$work" && mkdir -p "$work"
python3 "$here/bench_qlora.py" make-model --shape "$shape" --dir "$models" >"$out/make-model.log" 2>&1 || { tail "$out/make-model.log"; exit 1; }
cp examples/assets/tiny-llama/tokenizer.json examples/assets/tiny-llama/tokenizer_config.json "$models/$shape-bf16/"
python3 - "$models/$shape-bf16" "$work/train.jsonl" "${CHECK_TOKENS:-2000}" <<'PY'
import json, random, sys
from tokenizers import Tokenizer
tok = Tokenizer.from_file(f"{sys.argv[1]}/tokenizer.json")
words = [w for w in tok.get_vocab() if w.isalpha() and len(w) > 2]
rng, n = random.Random(0), int(sys.argv[3])
with open(sys.argv[2], "w") as f:
    for _ in range(64):
        ids = tok.encode(" ".join(rng.choice(words) for _ in range(2 * n)), add_special_tokens=False).ids[:n]
        f.write(json.dumps({"text": tok.decode(ids)}) + "\n")
PY
export AXOLOTL_DO_NOT_TRACK=1 PATH=/tmp/site/bin:$PATH
python3 - "$here/configs/axolotl-1b-kernels.yml" "$work/config.yml" "$models/$shape-bf16" "${CHECK_OVERRIDES:-{\}}" <<'PY'
import json, sys, yaml  # the config with this machine's model path and any overrides (JSON, a key's whole value)
cfg = yaml.safe_load(open(sys.argv[1]))
cfg["base_model"] = sys.argv[3]
cfg.update(json.loads(sys.argv[4]))
yaml.safe_dump(cfg, open(sys.argv[2], "w"), sort_keys=False)
PY
cp "$work/config.yml" "$out/axolotl-$shape-config.yml"
python3 -m axolotl.cli.main train "$work/config.yml" >"$out/axolotl-$shape.log" 2>&1
rc=$?
echo "axolotl train rc=$rc"
grep -E "qlora|LoRA kernels|tokens_per_second|tkps|memory|train_runtime" "$out/axolotl-$shape.log" | cut -c1-400 | tee "$out/axolotl-$shape-lines.txt" | tail -25
[ $rc -eq 0 ] || tail -30 "$out/axolotl-$shape.log"
exit $rc
