#!/usr/bin/env bash
# Issue 6, the next-layer prefetch of the tiered store (--prefetch hidden) against none: GPU
# test (prefetch never changes tokens), then `lcrun bench` with the prefetch off and on (hidden) in
# one call, Llama-3.1-8B shape, --gpu-mem 24GiB. Run from the repo root:
#   bash perf/device_prefetch.sh OUTDIR [contexts-off] [contexts-hidden]
set -u -o pipefail
out=${1:?usage: bash perf/device_prefetch.sh OUTDIR [contexts-off] [contexts-hidden]}
ctx_off=${2:-32k,512k}
ctx_hidden=${3:-512k}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:.
log="$out/device_prefetch.log"; t0=$SECONDS
step() { echo "=== $1 ($((SECONDS - t0)) s)" | tee -a "$log"; }
step "GPU test: prefetch never changes tokens"
timeout 120 python3 -m pytest -q -m gpu tests/test_gpu.py -x -k prefetch 2>&1 | tail -4 | tee -a "$log"
bench() {  # prefetch contexts
  step "lcrun bench --prefetch $1 --contexts $2"
  timeout 300 python3 -m lcrun.cli bench --model synthetic:llama-3.1-8b --gpu-mem 24GiB \
    --host-mem 72GiB --prefill-chunk 8192 --positions true --prefill topk --attention topk \
    --prefetch "$1" --contexts "$2" --steps 48 --out "$out/bench-prefetch-$1.json" 2>&1 | grep -v -i warn | tail -4 | tee -a "$log"
}
bench hidden "$ctx_hidden"
bench off "$ctx_off"
step "done"
