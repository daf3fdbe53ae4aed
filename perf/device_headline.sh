#!/usr/bin/env bash
# The headline run on the device, one call (issue "One path for the headline run"):
#   1. GPU tests of positions, key rotation and NVMe late pages (tokens against independent paths);
#   2. `lcrun bench` with the flags a user types (default attention, positions, prefetch) plus
#      --gpu-mem 24GiB, 8B synthetic shapes, 32K / 128K / 256K (past Llama 3.1's trained window);
#   3. quality through the default path on the demo model (passkey 32K and 128K, --gpu-mem 1GiB so
#      the KV pages live in pinned host memory).
# Run from the repo root with the demo model at $LCRUN_DEMO_MODEL (also what the GPU tests read):  bash perf/device_headline.sh OUTDIR
set -u -o pipefail
out=${1:?usage: bash perf/device_headline.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:.
log="$out/device_headline.log"; t0=$SECONDS
step() { echo "=== $1 ($((SECONDS - t0)) s)" | tee -a "$log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$log"

step "GPU tests"
timeout 110 python3 -m pytest -q -m gpu -x tests/test_gpu_positions.py tests/test_key_rotation.py \
  tests/test_tiered_nvme.py 2>&1 | tail -15 | tee -a "$log"

step "bench: default flags + --gpu-mem 24GiB, 32K 128K 256K"
cmd=(python3 -m lcrun.cli bench --model synthetic:llama-3.1-8b --gpu-mem 24GiB --contexts 32k,128k,256k
     --steps 48 --out "$out/bench-h200-headline-24gib.json")
echo "${cmd[*]}" | tee -a "$log"
timeout 270 "${cmd[@]}" 2>&1 | grep -v -i warn | tail -12 | tee -a "$log"

step "quality: passkey 32K/128K through the default path, --gpu-mem 1GiB"
timeout 120 python3 -m lcrun.cli eval --model "$LCRUN_DEMO_MODEL" --tasks passkey --lengths 32k,128k \
  --modes auto --trials 10 --gpu-mem 1GiB --time-limit 105 --out "$out/eval-h200-passkey-default-path.json" 2>&1 \
  | grep -v -i warn | tail -6 | tee -a "$log"
step "done"
