#!/usr/bin/env bash
# Device measurements, one named suite per call (each fits the device's 10-minute limit).
# Run from the repo root on the GPU machine:   LCRUN_COMMIT=<commit sent> bash perf/device.sh SUITE OUTDIR
#
#   headline  PHASE=bench: `lcrun bench` with the flags a user types plus --gpu-mem 24GiB at CONTEXTS
#             (32k,128k,256k; time limit BENCH_S, 500; EXTRA: more bench flags, e.g. --kv-dtype fp8);
#             PHASE=quality: GPU tests of positions, key rotation and NVMe late pages (TEST_FILES: others; TESTS=no:
#             none) beside, at once (time limit QUALITY_S, 420), passkey 32K/128K and the single needle at 32K, 20 trials,
#             and passkey 256K, 10 trials, with pages in host memory and on disk (--host-mem 2GiB),
#             through the default path on the demo model ($LCRUN_DEMO_MODEL) with --gpu-mem 1GiB (ONLY:
#             the names of the runs to make, e.g. "passkey256k-host passkey256k-nvme"; EVAL_EXTRA: more eval flags,
#             e.g. "--seed 1" for prompts other than the first run's);
#             unset PHASE: both
#   quick     the key-rotation GPU test, then `lcrun bench` with default flags + --gpu-mem 24GiB;
#             env TEST_S (test time limit, 40), BENCH_S (bench limit, 200), CONTEXTS (32k,256k)
#   tests     every GPU test (pytest -m gpu)
#   attention kernel GPU tests, then one attention layer, top-k vs dense, 32K-1M, per-layer times in
#             stacks of distinct layers with and without PDL (python -m perf.attention)
#   fp8       fp8 page GPU tests, then 512K decode with fp8 and bf16 pages (32K beside), 128 steps
#   prefetch  the GPU test that prefetch never changes tokens, then 512K decode, --prefetch hidden/off
#   cache     512K decode over 96 steps, and its selections replayed through caches of the store's
#             size (python -m perf.diag.tiered_reuse): what sets the GPU page cache's hit rate
#   profile   `lcrun bench` top-k 32K/128K/512K, dense 32K, transformers at 128K (env TF_CAP=no
#             lifts the cap from transformers), then `lcrun profile` at 128K (report.html)
#   pdl       32K/128K decode with programmatic dependent launch on and off (LCRUN_PDL)
#   nvme      256K decode with a 16 GiB host pool: half the KV pages in page files under /tmp/lcrun-kv
#   baselines `lcrun bench` 32K/128K with default flags + --gpu-mem 24GiB beside lcrun dense without a
#             cap and transformers eager and static-cache (torch.compile'd CUDA graphs) at TF_CONTEXTS (32k)
#   quant     quantized weights, STAGE=tests (GPU tests), gemv (GB/s on the 8B shapes vs a measured copy),
#             bench (8B WEIGHTS, q4_0 then bf16, at CONTEXTS, 0/32K/128K/256K), quality (demo model: perplexity, top-1 of
#             bf16/auto/q8_0/q4_0), llamacpp (PEERS=<peers dir>: build, a same-shape Q4_0 GGUF, llama-bench)
#   saved     a 128K context of the 8B shape (default flags + --gpu-mem 24GiB) saved to disk and loaded
#             again: load vs prefill seconds, and the next 32 greedy tokens compared (perf.diag.saved_context)
#   gemma     `lcrun plan` and `lcrun bench` of synthetic:gemma-3-12b beside synthetic:llama-3.1-8b, both
#             --weights ${WEIGHTS:-q4_0}, --gpu-mem 24GiB, at CONTEXTS (128k,256k)
#
# Every results file records its command line, commit, GPU and versions (lcrun bench, perf.attention).
set -u -o pipefail
usage="usage: bash perf/device.sh headline|quick|tests|attention|fp8|prefetch|cache|profile|pdl|nvme|quant|baselines|saved|gemma OUTDIR"
suite=${1:?$usage}
out=${2:?$usage}
suites=" headline quick tests attention fp8 prefetch cache profile pdl nvme quant baselines saved gemma "
[[ $suites == *" $suite "* ]] || { echo "unknown suite '$suite'; $usage" >&2; exit 2; }
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:.
log="$out/device-$suite.log"; t0=$SECONDS
step() { echo "=== $1 ($((SECONDS - t0)) s)" | tee -a "$log"; }
show() { grep -v -i warn | tail "-$1" | tee -a "$log"; }   # a step's last lines, without warnings
# The Llama-3.1-8B shape with random bf16 weights under a 24 GiB cap, attention and positions fixed
# (the suites that compare one setting keep everything else as it was measured before).
fixed=(python3 -m lcrun.cli bench --model synthetic:llama-3.1-8b --gpu-mem 24GiB --host-mem 72GiB
       --prefill-chunk 8192 --positions true --prefill topk --attention topk)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$log"
# The tree arrives without its own history: results record the commit only if the caller names it.
[[ -n ${LCRUN_COMMIT:-} ]] || echo "warning: LCRUN_COMMIT is unset, so results record the copy's stale git metadata;" \
  "call with LCRUN_COMMIT=<the commit sent> (git rev-parse HEAD here)" | tee -a "$log"

headline() {  # PHASE=bench or PHASE=quality runs one half (one device call each); default both
  local phase=${PHASE:-all}
  if [[ $phase == all || $phase == bench ]]; then
    step "bench: default flags + --gpu-mem 24GiB ${EXTRA:-}, ${CONTEXTS:=32k,128k,256k}"
    # shellcheck disable=SC2206
    local cmd=(python3 -m lcrun.cli bench --model synthetic:llama-3.1-8b --gpu-mem 24GiB ${EXTRA:-} --contexts "$CONTEXTS"
               --out "$out/bench-h200-headline-24gib.json")
    echo "${cmd[*]}" | tee -a "$log"
    timeout "${BENCH_S:-500}" "${cmd[@]}" 2>&1 | show 12
  fi
  if [[ $phase == all || $phase == quality ]]; then
    # The GPU tests and the evals share the GPU at once (none of them is timed); the demo model is
    # launch-bound, so the evals run side by side too.
    local tests_pid=
    if [[ ${TESTS:-yes} == yes ]]; then
      step "GPU tests (beside the evals): ${TEST_FILES:=tests/test_gpu_positions.py tests/test_key_rotation.py tests/test_tiered_nvme.py}"
      # shellcheck disable=SC2086
      timeout "${TEST_S:-400}" python3 -m pytest -q -m gpu $TEST_FILES > "$out/gpu-tests.log" 2>&1 &
      tests_pid=$!
    fi
    step "quality through the default path, --gpu-mem 1GiB: passkey 32K/128K, single needle 32K (20 trials);"\
         " passkey 256K with pages in host memory and with --host-mem 2GiB (pages on disk; 10 trials)"
    mkdir -p /tmp/lcrun-kv256
    # shellcheck disable=SC2206
    local limit=${QUALITY_S:-420} eval_=(python3 -m lcrun.cli eval --model "$LCRUN_DEMO_MODEL" --modes auto --gpu-mem 1GiB
                                         ${EVAL_EXTRA:-})
    local -a runs=(
      "passkey32k|--tasks passkey --lengths 32k --trials 20"
      "passkey128k|--tasks passkey --lengths 128k --trials 20"
      "needle32k|--tasks niah_single --lengths 32k --trials 20"
      "passkey256k-host|--tasks passkey --lengths 256k --trials 10"
      "passkey256k-nvme|--tasks passkey --lengths 256k --trials 10 --host-mem 2GiB --kv-dir /tmp/lcrun-kv256")
    local r name args
    local -a picked=()
    for r in "${runs[@]}"; do [[ -z ${ONLY:-} || " $ONLY " == *" ${r%%|*} "* ]] && picked+=("$r"); done
    runs=("${picked[@]}")
    for r in "${runs[@]}"; do
      name=${r%%|*}; args=${r#*|}
      # shellcheck disable=SC2086
      timeout $((limit + 30)) "${eval_[@]}" $args --time-limit "$limit" \
        --out "$out/eval-h200-$name-default-path.json" > "$out/eval-$name.log" 2>&1 &
    done
    wait
    for r in "${runs[@]}"; do name=${r%%|*}; echo "--- $name" | tee -a "$log"; show 4 < "$out/eval-$name.log"; done
    [[ -n $tests_pid ]] && { echo "--- GPU tests" | tee -a "$log"; tail -15 "$out/gpu-tests.log" | tee -a "$log"; }
  fi
}

quick() {
  timeout "${TEST_S:-40}" python3 -m pytest -q -m gpu -x tests/test_key_rotation.py 2>&1 | tail -3 | tee -a "$log"
  step "bench"
  local cmd=(python3 -m lcrun.cli bench --model synthetic:llama-3.1-8b --gpu-mem 24GiB --contexts "${CONTEXTS:-32k,256k}"
             --steps 24 --out "$out/bench-h200-headline-24gib.json")
  echo "${cmd[*]}" | tee -a "$log"
  timeout "${BENCH_S:-200}" "${cmd[@]}" 2>&1 | show 14
}

tests() {
  step "GPU tests"
  timeout 560 python3 -m pytest -q -m gpu tests 2>&1 | tail -15 | tee -a "$log"
}

attention() {
  step "GPU tests (kernels, graph-replayed decode)"
  timeout 150 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_gpu.py -x -k "not demo and not prefetch" 2>&1 \
    | tail -4 | tee -a "$log"
  step "one attention layer 128K, 1M, 32K, 512K with stacks"
  timeout 400 python3 -m perf.attention --contexts 128k,1M,32k,512k --hier-variants 32x16 --stack-hier 32x16,32x32 \
    --out "$out/attention-layer-32k-1m.json" 2>&1 | show 32
}

fp8() {
  step "GPU tests of the fp8 page path"
  timeout 130 python3 -m pytest -q --tb=short tests/test_tiered_kernels.py tests/test_gpu.py -k "fp8 or tiered_kernels" \
    2>&1 | grep -E "^E |Error|passed|failed" | head -30 | tee -a "$log"
  step "bench fp8 pages 32K + 512K"
  timeout 220 "${fixed[@]}" --steps 128 --kv-dtype fp8 --contexts 32k,512k --out "$out/bench-512k-fp8-pages.json" 2>&1 | show 3
  step "bench bf16 pages 512K"
  timeout 180 "${fixed[@]}" --steps 128 --contexts 512k --out "$out/bench-512k-bf16-pages.json" 2>&1 | show 3
}

prefetch() {
  step "GPU test: prefetch never changes tokens"
  timeout 120 python3 -m pytest -q -m gpu tests/test_gpu.py -x -k prefetch 2>&1 | tail -4 | tee -a "$log"
  local p ctx
  for p in hidden off; do
    ctx=512k; [ "$p" = off ] && ctx=32k,512k
    step "bench --prefetch $p --contexts $ctx"
    timeout 220 "${fixed[@]}" --prefetch "$p" --contexts "$ctx" --steps 48 --out "$out/bench-512k-prefetch-$p.json" 2>&1 | show 4
  done
}

cache() {
  mkdir -p /tmp/lcrun-kv
  step "bench 32K + 512K, 96 steps"
  timeout 300 "${fixed[@]}" --kv-dir /tmp/lcrun-kv --contexts 32k,512k --steps 96 --out "$out/bench-512k-96steps.json" 2>&1 | show 5
  step "selection reuse at 512K"
  timeout 270 python3 -m perf.diag.tiered_reuse --model synthetic:llama-3.1-8b --context 512k --steps 64 \
    --gpu-mem 24GiB --host-mem 72GiB --kv-dir /tmp/lcrun-kv --out "$out/diag-tiered-reuse-512k.json" 2>&1 | show 3
}

profile() {
  # 512K of KV is 64 GiB: all of it in pinned host memory (the default cap is half of what is free).
  mkdir -p /tmp/lcrun-kv
  local model=(--model synthetic:llama-3.1-8b --gpu-mem 24GiB --prefill-chunk 8192 --positions true)
  local tf_cap=--transformers-cap; [[ ${TF_CAP:-yes} == no ]] && tf_cap=--no-transformers-cap
  step "bench: top-k, dense and transformers"
  timeout 420 python3 -m lcrun.cli bench "${model[@]}" --attention topk --host-mem 72GiB --kv-dir /tmp/lcrun-kv \
    --contexts 32k,128k,512k --steps 32 --dense-contexts 32k \
    --transformers dense,offloaded --transformers-contexts 128k --transformers-steps 6 "$tf_cap" \
    --out "$out/bench-topk-dense-transformers-24gib.json" 2>&1 | show 20
  local left=$((535 - (SECONDS - t0))); ((left < 90)) && left=90  # the whole under ~9 minutes
  step "profile 128K"
  timeout "$left" python3 -m lcrun.cli profile "${model[@]}" --attention topk --ctx 128k --steps 6 --timed-steps 32 \
    --out-dir "$out/profile-128k-24gib" 2>&1 | show 10
}

pdl() {
  local p
  for p in 1 0; do
    step "bench 32K + 128K, LCRUN_PDL=$p"
    LCRUN_PDL=$p timeout 240 "${fixed[@]}" --contexts 32k,128k --steps 48 --out "$out/bench-pdl$p.json" 2>&1 | show 3
  done
}

baselines() {
  step "bench 32K/128K: default flags, lcrun dense without a cap, transformers eager and static"
  local cmd=(python3 -m lcrun.cli bench --model synthetic:llama-3.1-8b --gpu-mem 24GiB --contexts 32k,128k
             --dense-contexts 32k,128k --no-dense-cap --transformers dense,static
             --transformers-contexts "${TF_CONTEXTS:-32k}" --transformers-steps 16 --no-transformers-cap
             --out "$out/bench-h200-baselines-32k-128k.json")
  echo "${cmd[*]}" | tee -a "$log"
  timeout "${BENCH_S:-400}" "${cmd[@]}" 2>&1 | show 16
}

nvme() {
  mkdir -p /tmp/lcrun-kv
  step "bench 256K, 16 GiB host pool, pages spilled to /tmp/lcrun-kv"
  timeout 400 python3 -m lcrun.cli bench --model synthetic:llama-3.1-8b --gpu-mem 24GiB --host-mem 16GiB \
    --kv-dir /tmp/lcrun-kv --prefill-chunk 8192 --positions true --attention topk --contexts 256k --steps 32 \
    --out "$out/bench-256k-nvme-16gib-host.json" 2>&1 | show 6
}

quant() {  # STAGE=tests|gemv|bench|quality|llamacpp (one device call each); llamacpp also PEERS=<peers dir>
  case ${STAGE:?quant needs STAGE=tests|gemv|bench|quality|llamacpp} in
    tests)
      timeout 500 python3 -m pytest -q -m gpu -x tests/test_gpu_quant.py 2>&1 | tail -20 | tee -a "$log" ;;
    gemv)
      timeout 560 python3 -m perf.bench_qgemv --formats Q4_0,Q8_0,Q4_K,Q6_K --out "$out/qgemv-h200.json" 2>&1 \
        | tee -a "$log" ;;
    bench)
      for w in ${WEIGHTS:-q4_0 bf16}; do
        local cmd=(python3 -m lcrun.cli bench --model synthetic:llama-3.1-8b --weights $w --gpu-mem 24GiB
                   --contexts "${CONTEXTS:-0,32k,128k,256k}" --steps 32 --out "$out/bench-h200-8b-$w-24gib.json")
        echo "${cmd[*]}" | tee -a "$log"
        timeout 280 "${cmd[@]}" 2>&1 | show 14
      done ;;
    quality)
      timeout 560 python3 -m perf.quant_quality --device cuda --model "$LCRUN_DEMO_MODEL" --modes bf16,auto,q8_0,q4_0 \
        --tokens 4096 --out "$out/quant-quality-h200.json" 2>&1 | tee -a "$log" ;;
    llamacpp)  # the peers' llama.cpp script sits in the device folder beside PEERS (the shared tree)
      local peers=${PEERS:?llamacpp needs PEERS=<the shared peers folder>}
      local sh_=$peers/../device/llamacpp.sh
      [ -x /tmp/lcpp/llama.cpp/build/bin/llama-bench ] || timeout 560 bash "$sh_" build "$peers" 2>&1 | tail -5 | tee -a "$log"
      bash "$sh_" model "$peers" q4_0 2>&1 | tail -2 | tee -a "$log"
      bash "$sh_" bench q4_0 0,32768,131072 > "$out/llamacpp-h200-q4_0-f16kv.json" 2>> "$log"
      bash "$sh_" bench q4_0 131072,262144 -ctk q8_0 -ctv q8_0 > "$out/llamacpp-h200-q4_0-q8kv.json" 2>> "$log"
      # prefill of a 32K and a 128K prompt from empty (llama-bench appends -p/-n to the script's -p 0 -n 32)
      bash "$sh_" bench q4_0 0 -p 32768,131072 -r 1 > "$out/llamacpp-h200-q4_0-prefill.json" 2>> "$log"
      tail -c 2000 "$out"/llamacpp-h200-q4_0-*.json | tee -a "$log" ;;
    *) echo "unknown quant STAGE $STAGE" >&2; exit 2 ;;
  esac
}

saved() {
  mkdir -p /tmp/lcrun-ctx
  step "save and load a ${CONTEXT:-128k} context"
  timeout "${SAVED_S:-300}" python3 -m perf.diag.saved_context --model synthetic:llama-3.1-8b --context "${CONTEXT:-128k}" \
    --gpu-mem 24GiB --path /tmp/lcrun-ctx/ctx.lcctx --out "$out/saved-context-h200-${CONTEXT:-128k}-24gib.json" 2>&1 | show 24
  rm -f /tmp/lcrun-ctx/ctx.lcctx
}

gemma() {
  local w=${WEIGHTS:-q4_0} m
  for m in gemma-3-12b llama-3.1-8b; do
    step "plan and bench synthetic:$m --weights $w at ${CONTEXTS:-128k,256k}"
    python3 -m lcrun.cli plan --model "synthetic:$m" --weights "$w" --gpu-mem 24GiB --ctx 256k 2>&1 | show 30
    timeout "${BENCH_S:-240}" python3 -m lcrun.cli bench --model "synthetic:$m" --weights "$w" --gpu-mem 24GiB \
      --contexts "${CONTEXTS:-128k,256k}" --steps 32 --out "$out/bench-h200-$m-$w-24gib.json" 2>&1 | show 8
  done
}

"$suite"
step "done"
