#!/usr/bin/env bash
# Issue 3's round 6 on the device, two calls (each under the 10-minute limit). Part "kernels":
# GPU tests (PDL on by default on sm90+) and bench_attention with per-layer times in a stack of
# distinct layers, PDL on/off side by side. Part "decode": `lcrun bench` 32K/128K decode with PDL on
# and off. Run from the repo root:   bash perf/device_pdl.sh OUTDIR kernels|decode
set -u -o pipefail
out=${1:?usage: bash perf/device_pdl.sh OUTDIR kernels|decode}
part=${2:?usage: bash perf/device_pdl.sh OUTDIR kernels|decode}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:.
log="$out/device_pdl.log"; t0=$SECONDS
step() { echo "=== $1 ($((SECONDS - t0)) s)" | tee -a "$log"; }
if [ "$part" = kernels ]; then
step "GPU tests (kernels, graph-replayed decode)"
timeout 150 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_gpu.py -x -k "not demo" 2>&1 | tail -4 | tee -a "$log"
step "bench_attention 128K, 1M, 32K, 512K with stacks"
timeout 420 python3 perf/bench_attention.py --contexts 128k,1M,32k,512k --hier-variants 32x16 \
  --stack-hier 32x16,32x32 --out "$out/bench_attention-h200-stack-pdl.json" 2>&1 | grep -v -i warn | tail -32 | tee -a "$log"
else
for pdl in 1 0; do
  step "lcrun bench 32K + 128K, LCRUN_PDL=$pdl"
  LCRUN_PDL=$pdl timeout 240 python3 -m lcrun.cli bench --model synthetic:llama-3.1-8b --gpu-mem 24GiB \
    --host-mem 72GiB --prefill-chunk 8192 --positions true --prefill topk \
    --attention topk --contexts 32k,128k --steps 48 --out "$out/bench-pdl$pdl.json" 2>&1 | grep -v -i warn | tail -3 | tee -a "$log"
done
fi
step "done"
