#!/usr/bin/env bash
# Issue 6's 512K question on the device, one call: is the GPU page cache's hit rate at 512K set by
# its direct mapping (conflicts) or by how much the selection changes between steps? Run from the
# repo root:   bash perf/device_cache.sh OUTDIR
# 1. `lcrun bench` 32K + 512K with 96 decode steps (decode_ms and decode_ms_late: is it warming?)
#    (~4 min: pinning 64 GiB of host pages, sparse prefill at ~18K tok/s);
# 2. perf/diag_tiered_reuse.py at 512K: 64 eager steps recorded and replayed through direct-mapped,
#    4-way, 16-way and LRU caches of the store's size (~3 min).
set -u -o pipefail
out=${1:?usage: bash perf/device_cache.sh OUTDIR}
mkdir -p "$out" /tmp/lcrun-kv
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:.
log="$out/device_cache.log"; t0=$SECONDS
step() { echo "=== $1 ($((SECONDS - t0)) s)" | tee -a "$log"; }
common=(--gpu-mem 24GiB --host-mem 72GiB --kv-dir /tmp/lcrun-kv)
step "bench 32K + 512K, 96 steps"
timeout 300 python3 -m lcrun.cli bench --model synthetic:llama-3.1-8b "${common[@]}" --prefill-chunk 8192 \
  --positions true --attention topk --prefill topk --contexts 32k,512k --steps 96 --out "$out/bench512.json" 2>&1 \
  | grep -v -i warn | tail -5 | tee -a "$log"
step "selection reuse at 512K"
timeout 270 python3 perf/diag_tiered_reuse.py --model synthetic:llama-3.1-8b --context 512k --steps 64 \
  "${common[@]}" --out "$out/tiered-reuse-512k.json" 2>&1 | grep -v -i warn | tail -3 | tee -a "$log"
step "done"
