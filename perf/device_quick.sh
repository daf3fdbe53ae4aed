#!/usr/bin/env bash
# Short device call: the GPU kernel test of key rotation, then `lcrun bench` with the flags a user
# types plus --gpu-mem 24GiB at 32K and 256K (past Llama 3.1's trained window).
set -u -o pipefail
out=${1:?usage: bash perf/device_quick.sh OUTDIR}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:.
log="$out/device_quick.log"; t0=$SECONDS
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$log"
timeout ${TEST_S:-40} python3 -m pytest -q -m gpu -x tests/test_key_rotation.py 2>&1 | tail -3 | tee -a "$log"
echo "=== bench ($((SECONDS - t0)) s)" | tee -a "$log"
cmd=(python3 -m lcrun.cli bench --model synthetic:llama-3.1-8b --gpu-mem 24GiB --contexts ${CONTEXTS:-32k,256k}
     --steps 24 --out "$out/bench-h200-headline-24gib.json")
echo "${cmd[*]}" | tee -a "$log"
timeout ${BENCH_S:-200} "${cmd[@]}" 2>&1 | grep -v -i warn | tail -14 | tee -a "$log"
echo "=== done ($((SECONDS - t0)) s)" | tee -a "$log"
