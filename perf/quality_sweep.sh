#!/usr/bin/env bash
# Issue 5 on the device: which top-k settings keep the demo model (SmolLM2-135M, trained to 8K)
# accurate, one JSON per setting. Usage: bash perf/quality_sweep.sh MODEL.gguf OUTDIR
# passkey at 32K with window positions by budget / group score, and the teacher-forced fidelity
# test at 8K by page size / group score (about 4 minutes on an H100).
set -u
model=${1:?model}; out=${2:?outdir}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:.
ev() { name=$1; shift; timeout 150 python3 -m perf.eval_longctx --model "$model" --out "$out/$name.json" "$@" 2>&1 \
         | grep -v -i warn | tail -4; }
for b in 1024 2048 4096; do ev passkey32k-b$b --tasks passkey --lengths 32k --modes topk:window --budget $b; done
ev passkey32k-b1024-sum --tasks passkey --lengths 32k --modes topk:window --group-score sum
ev niah32k-b2048 --tasks niah_single --lengths 32k --modes topk:window --budget 2048
for cfg in "32 max" "16 max" "32 sum"; do set -- $cfg
  ev fidelity8k-p$1-$2 --tasks "" --fidelity-lengths 8k --fidelity-steps 512 --page-size $1 --group-score $2; done
