#!/usr/bin/env bash
# Issue 17's checks beside the benchmark, on a machine with two GPUs, from the repository root:
#   WHEELS=pinned bash benchmarks/multigpu_extras.sh [probe] [axolotl] [resume]
# probe:   benchmarks/fsdp_bytes_probe.py on both GPUs (which FSDP2 settings change bf16-stored
#          4-bit bytes, with and without the plugin's byte-exact all-gather) -> $OUT/probe/fsdp_bytes.json
# axolotl: `axolotl train configs/qlora.yml` (DDP over both GPUs) and configs/qlora-fsdp2.yml
#          (FSDP2), the README's commands; each log's tail -> $OUT/axolotl-{ddp,fsdp2}.log
# resume:  FSDP2 checkpoint and resume with a user's own SFTConfig (benchmarks/fsdp_resume_job.py):
#          8 steps saving every 4, then a copy resumed from checkpoint-4, then the adapter loaded
#          with PEFT on one GPU -> $OUT/resume.json (losses side by side), $OUT/resume-*.log
# Wheels: .whl/pinned (benchmarks/fetch_wheels.sh) and, for axolotl, .whl/axolotl.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export PATH=/tmp/site/bin:$PATH AXOLOTL_DO_NOT_TRACK=1
status=0
for stage in "${@:-probe axolotl}"; do
  for name in $stage; do
    echo "== $name $(date +%T)"
    case "$name" in
      probe)
        timeout 300 python3 -m torch.distributed.run --nproc_per_node 2 "$here/fsdp_bytes_probe.py" --out "$out/probe" \
          >"$out/probe.log" 2>&1 || status=1
        grep '^{' "$out/probe.log" | cut -c1-330 ;;
      axolotl)
        for config in qlora qlora-fsdp2; do
          log="$out/axolotl-${config#qlora-}.log"; [ "$config" = qlora ] && log="$out/axolotl-ddp.log"
          timeout 300 axolotl train "configs/$config.yml" >"/tmp/$config.log" 2>&1
          rc=$?; [ $rc -eq 0 ] || status=1
          { echo "exit $rc"; grep -E "qlora|'loss'|Error|world_size|num_processes|was set to" "/tmp/$config.log" | tail -60; } >"$log"
          echo "$config: exit $rc"; grep -E "'loss'" "/tmp/$config.log" | tail -2; grep -E "Error" "/tmp/$config.log" | tail -3
        done ;;
      resume)
        job="$here/fsdp_resume_job.py"; first=/tmp/resume-first; again=/tmp/resume-again
        rm -rf "$first" "$again"
        launch=(timeout 240 accelerate launch --config_file configs/accelerate/fsdp2.yaml "$job")
        "${launch[@]}" "$first" >"$out/resume-first.log" 2>&1 || status=1
        cp -r "$first" "$again" && rm -rf "$again/checkpoint-8" "$again/adapter" "$again/losses.json"
        "${launch[@]}" "$again" --resume >"$out/resume-again.log" 2>&1 || status=1
        timeout 120 python3 "$job" "$again" --check-adapter >"$out/resume-adapter.log" 2>&1 || status=1
        python3 "$job" "$first" --compare "$again" >"$out/resume.json" || status=1
        grep -hE "qlora|Error" "$out"/resume-*.log | sort | uniq -c | head -20; head -c 600 "$out/resume.json"; echo ;;
      *) echo "unknown stage $name"; status=2 ;;
    esac
  done
done
exit $status
