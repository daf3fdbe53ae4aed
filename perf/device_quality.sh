#!/usr/bin/env bash
# Issue 5 cells past the trained window (window positions) and issue 3's attention bench, one
# device call after the demo model is carried. Usage: bash perf/device_quality.sh MODEL.gguf OUTDIR
set -u -o pipefail
model=${1:?model}; out=${2:?outdir}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:. LCRUN_DEMO_MODEL=$model
log="$out/quality.log"; t0=$SECONDS
step() { echo "=== $1 ($((SECONDS - t0)) s)" | tee -a "$log"; }
ev() { name=$1; limit=$2; shift 2; timeout "$limit" python3 -m perf.eval_longctx --model "$model" \
         --out "$out/$name.json" "$@" 2>&1 | grep -v -i warn | tail -3 | tee -a "$log"; }
step "passkey 32K window"; ev passkey32k 130 --tasks passkey --lengths 32k --modes topk:window --trials 20
step "niah 32K window"; ev niah32k 130 --tasks niah_single --lengths 32k --modes topk:window --trials 20
step "passkey 128K window"; ev passkey128k 130 --tasks passkey --lengths 128k --modes topk:window --trials 6 --time-limit 100
step "bench_attention"
timeout 120 python3 perf/bench_attention.py --out "$out/bench_attention.json" 2>&1 | grep -v -i warn | tail -12 | tee -a "$log"
step "done"
