#!/usr/bin/env bash
# Quantized weights on the device (issue 18), in stages that each fit one 10-minute call:
#   bash perf/device_quant.sh OUT tests     # GPU tests of the quantized kernels and model (~1-2 min)
#   bash perf/device_quant.sh OUT gemv      # GEMV GB/s on the 8B shapes vs the measured copy bandwidth
#   bash perf/device_quant.sh OUT bench     # lcrun bench 8B q4_0 then bf16, --gpu-mem 24GiB, 0/32K/128K/256K
#   bash perf/device_quant.sh OUT quality   # demo model: perplexity, top-1 agreement of bf16/auto(Q4_1)/q8_0/q4_0
#   bash perf/device_quant.sh OUT llamacpp PEERS_DIR   # llama.cpp build + Q4_0 GGUF + llama-bench, same
#                                           # depths (../shared/device/llamacpp.sh; ~5-9 min build; keep the
#                                           # machine warm between stages)
# Every stage writes JSON and a log under OUT. Run from the repo root.
set -u -o pipefail
out=${1:?usage: bash perf/device_quant.sh OUT tests|gemv|bench|quality|llamacpp [PEERS_DIR]}
stage=${2:?stage: tests|gemv|bench|quality|llamacpp}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:.
log="$out/device_quant-$stage.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$log"
case $stage in
  tests)
    timeout 500 python3 -m pytest -q -m gpu -x tests/test_gpu_quant.py 2>&1 | tail -20 | tee -a "$log" ;;
  gemv)
    timeout 560 python3 perf/bench_qgemv.py --formats Q4_0,Q8_0,Q4_K,Q6_K --out "$out/qgemv-h200.json" 2>&1 \
      | tee -a "$log" ;;
  bench)
    for w in q4_0 bf16; do
      cmd=(python3 -m lcrun.cli bench --model synthetic:llama-3.1-8b --weights $w --gpu-mem 24GiB
           --contexts 0,32k,128k,256k --steps 32 --out "$out/bench-h200-8b-$w-24gib.json")
      echo "${cmd[*]}" | tee -a "$log"
      timeout 280 "${cmd[@]}" 2>&1 | grep -v -i warn | tail -14 | tee -a "$log"
    done ;;
  quality)
    timeout 560 python3 perf/quant_quality.py --device cuda --model "$LCRUN_DEMO_MODEL" --modes bf16,auto,q8_0,q4_0 \
      --tokens 4096 --out "$out/quant-quality-h200.json" 2>&1 | tee -a "$log" ;;
  llamacpp)
    peers=${3:?usage: bash perf/device_quant.sh OUT llamacpp PEERS_DIR}
    sh_=$peers/../device/llamacpp.sh
    [ -x /tmp/lcpp/llama.cpp/build/bin/llama-bench ] || timeout 560 bash "$sh_" build "$peers" 2>&1 | tail -5 | tee -a "$log"
    bash "$sh_" model "$peers" q4_0 2>&1 | tail -2 | tee -a "$log"
    bash "$sh_" bench q4_0 0,32768,131072 > "$out/llamacpp-h200-q4_0-f16kv.json" 2>> "$log"
    bash "$sh_" bench q4_0 131072,262144 -ctk q8_0 -ctv q8_0 > "$out/llamacpp-h200-q4_0-q8kv.json" 2>> "$log"
    # prefill of a 32K and a 128K prompt from empty (llama-bench appends -p/-n to the script's -p 0 -n 32)
    bash "$sh_" bench q4_0 0 -p 32768,131072 -r 1 > "$out/llamacpp-h200-q4_0-prefill.json" 2>> "$log"
    tail -c 2000 "$out"/llamacpp-h200-q4_0-*.json | tee -a "$log" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
