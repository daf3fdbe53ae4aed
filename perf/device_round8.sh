#!/usr/bin/env bash
# Issue 3's round 8 on the device (one call): GPU tests (kernels, graph-replayed decode including a
# 256K hierarchical cache), bench_attention at 32K-1M with per-layer stacks, then `lcrun bench`
# decode at 32K and 128K under 24 GiB. Run from the repo root:   bash perf/device_round8.sh OUTDIR
set -u -o pipefail
out=${1:?usage: bash perf/device_round8.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:.
log="$out/device_round8.log"; t0=$SECONDS
step() { echo "=== $1 ($((SECONDS - t0)) s)" | tee -a "$log"; }
step "GPU tests"
timeout 150 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_gpu.py -k "not demo and not prefetch" 2>&1 | tail -3 | tee -a "$log"
step "bench_attention 128K, 1M, 32K, 512K with stacks"
timeout 240 python3 perf/bench_attention.py --contexts 128k,1M,32k,512k --hier-variants 32x16 \
  --stack-hier 32x16,32x32 --out "$out/bench_attention-h200-round8.json" 2>&1 | grep -v -i warn | tail -14 | tee -a "$log"
step "lcrun bench 32K + 128K"
timeout 150 python3 -m lcrun.cli bench --model synthetic:llama-3.1-8b --gpu-mem 24GiB --host-mem 72GiB \
  --prefill-chunk 8192 --positions true --prefill topk --attention topk --contexts 32k,128k --steps 48 \
  --out "$out/bench-round8.json" 2>&1 | grep -v -i warn | tail -3 | tee -a "$log"
step "done"
