#!/usr/bin/env bash
# One device call's worth of checks and benchmarks (run from the repo root on the GPU machine).
# Usage: bash perf/device_suite.sh OUTDIR [tests|attention|decode128|decode256|all]
set -u
out=${1:?outdir}; what=${2:-all}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:.
mkdir -p "$out"
run() { echo "=== $*"; "$@"; }
if [[ $what == tests || $what == all ]]; then
  run python3 -m pytest -q -m gpu -x tests 2>&1 | tail -15 | tee "$out/gpu_tests.log"
fi
if [[ $what == attention || $what == all ]]; then
  run python3 perf/bench_attention.py --out "$out/bench_attention.json" 2>&1 | tail -25
fi
if [[ $what == decode128 || $what == all ]]; then
  run python3 perf/bench_decode.py --model synthetic:llama-3.1-8b --contexts 128k --steps 24 --attention topk \
      --gpu-mem 24GiB --prefill-chunk 8192 --trace "$out/trace_decode_128k.json" \
      --out "$out/bench_decode_128k_tiered.json" 2>&1 2>&1 | grep -v Warn | tail -40
fi
if [[ $what == base128 || $what == all ]]; then
  # lcrun dense (whole KV on the GPU, no cap) and transformers' offloaded cache, same shape
  run python3 perf/bench_decode.py --model synthetic:llama-3.1-8b --contexts 128k --steps 6 --attention dense \
      --prefill-chunk 8192 --transformers-offloaded --out "$out/bench_decode_128k_baselines.json" 2>&1 2>&1 | grep -v Warn | tail -40
fi
if [[ $what == decode256 || $what == all ]]; then
  # 256K with a 16 GiB host pool: about half the KV pages live in page files under --kv-dir
  mkdir -p /tmp/lcrun-kv
  run python3 perf/bench_decode.py --model synthetic:llama-3.1-8b --contexts 256k --steps 32 --attention topk \
      --gpu-mem 24GiB --host-mem 16GiB --kv-dir /tmp/lcrun-kv --prefill-chunk 8192 --positions true \
      --out "$out/bench_decode_256k_nvme.json" 2>&1 2>&1 | grep -v Warn | tail -40
fi
