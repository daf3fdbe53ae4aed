#!/usr/bin/env bash
# Issue 5 on the device, after the demo model is carried (../shared/device/smollm2-carry.sh).
#   bash perf/device_quality.sh MODEL.gguf OUTDIR within   # within the trained window + fidelity + 32K
#   bash perf/device_quality.sh MODEL.gguf OUTDIR long MODE  # 128K (20 trials) and 1M passkey
#   bash perf/device_quality.sh MODEL.gguf OUTDIR past MODE BUDGET  # 32K passkey + needle, 128K passkey
# "within": every task at 4K and 7.3K, dense vs top-k (20 trials each); the teacher-forced
# fidelity at 8000 tokens in fp32 and bf16, with a budget >= the context as the dtype's noise
# floor; passkey and single needle at 32K with window positions, far pages "fixed" and "paged".
# "long": passkey at 128K with 20 trials and at 1M (as many trials as fit), far positions MODE.
set -u -o pipefail
model=${1:?model}; out=${2:?outdir}; part=${3:?within or long}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:. LCRUN_DEMO_MODEL=$model
log="$out/quality-$part.log"; t0=$SECONDS
step() { echo "=== $1 ($((SECONDS - t0)) s)" | tee -a "$log"; }
ev() { name=$1; limit=$2; shift 2; timeout "$limit" python3 -m perf.eval_longctx --model "$model" \
         --out "$out/$name.json" "$@" 2>&1 | grep -v -i warn | tail -4 | tee -a "$log"; }
if [ "$part" = within ]; then
  step "all tasks 4K / 7.3K, dense vs top-k"
  ev within8k 200 --tasks passkey,niah_single,niah_multikey,niah_multivalue --lengths 4k,7.3k \
     --modes dense,topk:true --trials 20 --time-limit 180
  step "fidelity 8000 fp32"
  ev fidelity8k-fp32 60 --tasks "" --fidelity-lengths 8000 --fidelity-steps 1024 --modes topk:true --dtype float32
  step "fidelity 8000 fp32, budget 8192 (noise floor)"
  ev fidelity8k-fp32-floor 60 --tasks "" --fidelity-lengths 8000 --fidelity-steps 1024 --modes topk:true \
     --dtype float32 --budget 8192
  step "fidelity 8000 bf16 + floor"
  ev fidelity8k-bf16 40 --tasks "" --fidelity-lengths 8000 --fidelity-steps 1024 --modes topk:true
  ev fidelity8k-bf16-floor 40 --tasks "" --fidelity-lengths 8000 --fidelity-steps 1024 --modes topk:true --budget 8192
  for fp in paged; do
    step "passkey 32K window $fp"; ev passkey32k-$fp 100 --tasks passkey --lengths 32k --modes topk:window \
       --far-positions $fp --trials 20
    step "niah 32K window $fp"; ev niah32k-$fp 100 --tasks niah_single --lengths 32k --modes topk:window \
       --far-positions $fp --trials 20
  done
elif [ "$part" = past ]; then
  fp=${4:?far positions}; budget=${5:?budget}
  for task in passkey niah_single; do
    step "$task 32K window $fp budget $budget"; ev $task-32k-$fp-b$budget 150 --tasks $task --lengths 32k \
       --modes topk:window --far-positions $fp --budget $budget --trials 20 --time-limit 125
  done
  step "passkey 128K window $fp budget $budget"; ev passkey-128k-$fp-b$budget 330 --tasks passkey --lengths 128k \
     --modes topk:window --far-positions $fp --budget $budget --trials 20 --time-limit 310
else
  fp=${4:?far positions}
  step "fidelity 8000 fp32 + floor"
  ev fidelity8k-fp32 40 --tasks "" --fidelity-lengths 8000 --fidelity-steps 1024 --modes topk:true --dtype float32
  ev fidelity8k-fp32-floor 40 --tasks "" --fidelity-lengths 8000 --fidelity-steps 1024 --modes topk:true \
     --dtype float32 --budget 8192
  step "passkey 128K window $fp"; ev passkey128k-$fp 225 --tasks passkey --lengths 128k --modes topk:window \
     --far-positions $fp --trials 20 --time-limit 195
  step "passkey 1M window $fp"; ev passkey1m-$fp 300 --tasks passkey --lengths 1M --modes topk:window \
     --far-positions $fp --trials 3 --time-limit 140
fi
step "done"
