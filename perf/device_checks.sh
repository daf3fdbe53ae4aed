#!/usr/bin/env bash
# One device call after the model is carried (see ../shared/device/smollm2-carry.sh): the GPU
# tests, then issue 5's window-position passkey cells at 32K by far-position mode, then the
# 32K/512K decode bench with sparse prefill. Usage: bash perf/device_checks.sh MODEL.gguf OUTDIR
set -u -o pipefail
model=${1:?model}; out=${2:?outdir}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:. LCRUN_DEMO_MODEL=$model
log="$out/checks.log"; t0=$SECONDS
step() { echo "=== $1 ($((SECONDS - t0)) s)" | tee -a "$log"; }
step "GPU tests"
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -15 | tee -a "$log"
ev() { name=$1; shift; timeout 120 python3 -m perf.eval_longctx --model "$model" --out "$out/$name.json" "$@" 2>&1 \
         | grep -v -i warn | tail -3 | tee -a "$log"; }
for fp in ordered fixed; do step "passkey 32K window $fp"
  ev passkey32k-$fp --tasks passkey --lengths 32k --modes topk:window --far-positions $fp --trials ${TRIALS:-10}; done
step "bench 32K + 512K (sparse prefill)"
mkdir -p /tmp/kv
timeout 200 python3 -m lcrun.cli bench --model synthetic:llama-3.1-8b --gpu-mem 24GiB --prefill-chunk 8192 \
  --positions true --attention topk --prefill topk --host-mem 72GiB --kv-dir /tmp/kv --contexts 32k,512k --steps 32 \
  --out "$out/bench512.json" 2>&1 | grep -v -i warn | tail -5 | tee -a "$log"
step "done"
