#!/usr/bin/env bash
# Issue 6 on the device (H100 or H200), one device call: `lcrun bench` and `lcrun profile` on the Llama-3.1-8B shape
# (random bf16 weights) under --gpu-mem 24GiB. Run from the repo root:
#     bash perf/device_profile.sh OUTDIR
# Writes OUTDIR/bench.json, OUTDIR/profile_128k/{report.html,report.json,trace.json.gz} and
# OUTDIR/device_profile.log (5 files; the trace is ~1-3 MB gzipped).
#
# Estimated runtime, about 6.5 minutes (each step is capped by `timeout`, 9 minutes in all):
#   bench, one process (~5 min): lcrun top-k 32K (~15 s), 128K (~40 s: prefill ~26 s), 512K (~150 s:
#   pinning 64 GiB of host pages, prefill at ~5K tok/s); lcrun dense 32K (~15 s); transformers
#   at 128K: its GPU cache under the same 24 GiB cap (runs out of memory ~60K tokens in, ~15 s,
#   recorded as that row's error; TF_CAP=no lifts the cap: ~40 s), its offloaded cache (~55 s:
#   prefill ~39 s, 6 steps at ~1.4 s).
#   profile 128K (~80 s): prefill ~26 s, 6 profiled eager steps, trace export and attribution,
#   32 timed steps, report.
# The bench JSON is rewritten after every measurement, so a run cut short keeps its finished rows.
set -u -o pipefail
out=${1:?usage: bash perf/device_profile.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:.
# 512K of KV is 64 GiB: keep it all in pinned host memory (the default cap is half of what is free);
# --kv-dir is where the NVMe tier would spill if the plan needs it.
HOST_MEM=${HOST_MEM:-72GiB}
KV_DIR=${KV_DIR:-/tmp/lcrun-kv}
TF_CAP=${TF_CAP:-yes}
mkdir -p "$KV_DIR"
# --positions true: contexts past Llama-3.1's 128K would otherwise pick window positions.
model=(--model synthetic:llama-3.1-8b --gpu-mem 24GiB --prefill-chunk 8192 --positions true)
tf_cap=--transformers-cap; [[ $TF_CAP == no ]] && tf_cap=--no-transformers-cap
log="$out/device_profile.log"
t0=$SECONDS

echo "=== lcrun bench" | tee "$log"
timeout 420 python3 -m lcrun.cli bench "${model[@]}" --attention topk --host-mem "$HOST_MEM" --kv-dir "$KV_DIR" \
    --contexts 32k,128k,512k --steps 32 --dense-contexts 32k \
    --transformers dense,offloaded --transformers-contexts 128k --transformers-steps 6 "$tf_cap" \
    --out "$out/bench.json" 2>&1 | grep --line-buffered -v -i warn | tee -a "$log"
echo "bench: rc ${PIPESTATUS[0]}, $((SECONDS - t0)) s" | tee -a "$log"

t1=$SECONDS
echo "=== lcrun profile 128K" | tee -a "$log"
left=$((535 - (SECONDS - t0))); ((left < 90)) && left=90  # keep the whole under ~9 minutes
timeout "$left" python3 -m lcrun.cli profile "${model[@]}" --attention topk --ctx 128k \
    --steps 6 --timed-steps 32 --out-dir "$out/profile_128k" 2>&1 | grep --line-buffered -v -i warn | tee -a "$log"
echo "profile: rc ${PIPESTATUS[0]}, $((SECONDS - t1)) s; total $((SECONDS - t0)) s" | tee -a "$log"
ls -la "$out" "$out/profile_128k" | tee -a "$log"
# To commit: bench.json -> perf/results/bench-<gpu>-<date>-llama8b-24gib.json;
# profile_128k/ -> perf/reports/profile-<gpu>-128k-24gib/ (report.html links trace.json.gz beside it).
