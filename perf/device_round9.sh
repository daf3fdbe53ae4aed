#!/usr/bin/env bash
# Issue 6's round 9 on the device (one call): GPU tests of the fp8 page path (compiled kernels
# against their references, graph vs eager decode on an fp8 tiered store), then `lcrun bench`
# decode at 32K and 512K under 24 GiB with fp8 pages, then (unless BF16=0) 512K with bf16 pages,
# 128 steps each.
# Run from the repo root:   bash perf/device_round9.sh OUTDIR
set -u -o pipefail
out=${1:?usage: bash perf/device_round9.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:.
log="$out/device_round9.log"; t0=$SECONDS
step() { echo "=== $1 ($((SECONDS - t0)) s)" | tee -a "$log"; }
bench=(python3 -m lcrun.cli bench --model synthetic:llama-3.1-8b --gpu-mem 24GiB --host-mem 72GiB
       --prefill-chunk 8192 --positions true --prefill topk --attention topk --steps 128)
step "GPU tests"
timeout 130 python3 -m pytest -q --tb=short tests/test_tiered_kernels.py tests/test_gpu.py -k "fp8 or tiered_kernels" 2>&1 | grep -E "^E |Error|passed|failed" | head -30 | tee -a "$log"
step "lcrun bench fp8 pages 32K + 512K"
timeout 220 "${bench[@]}" --kv-dtype fp8 --contexts 32k,512k --out "$out/bench-round9-fp8.json" 2>&1 | grep -v -i warn | tail -3 | tee -a "$log"
[ "${BF16:-1}" = 1 ] || { step "done"; exit 0; }
step "lcrun bench bf16 pages 512K"
timeout 180 "${bench[@]}" --contexts 512k --out "$out/bench-round9-bf16-512k.json" 2>&1 | grep -v -i warn | tail -3 | tee -a "$log"
step "done"
