"""Where a decode step's GPU time goes, kernel by kernel: prefill a random prompt, warm up, then
profile eager decode steps with the torch profiler and sum each kernel's device time per step;
also time the same steps as the generator runs them (CUDA-graph replays where the cache allows).

    python -m perf.diag.kernel_breakdown --model synthetic:llama-3.1-8b --ctx 128k --gpu-mem 24GiB \
        --out perf/results/kernels-h100-128k.json

The per-kernel table answers "which kernels to make faster"; `lcrun profile` gives the same
steps split by the runtime's named ranges."""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch


from lcrun.api import LLM
from lcrun.config import LcrunConfig
from lcrun.profiling.bench import random_prompt, time_steps, warm_median
from lcrun.profiling.meta import run_metadata
from lcrun.profiling.trace import DEVICE_CATS, category


def breakdown(llm: LLM, steps: int) -> dict:
    """Per-kernel device time of ``steps`` eager decode steps, from the profiler's Chrome trace
    (its "kernel"/"gpu_memcpy"/"gpu_memset" events: device timestamps, every stream)."""
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    token = torch.zeros(1, dtype=torch.long, device=llm.device)
    model, cache = llm.model, llm.cache
    for _ in range(3):  # compile and warm every eager kernel first
        model.forward(token, cache)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            model.forward(token, cache)
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    intervals = []
    for e in events:
        if e.get("ph") != "X" or category(e) not in DEVICE_CATS:
            continue
        per_kernel[e["name"]][0] += e["dur"]
        per_kernel[e["name"]][1] += 1
        intervals.append((e["ts"], e["ts"] + e["dur"]))
    busy, end = 0.0, float("-inf")
    for s, t in sorted(intervals):  # union of kernel intervals: GPU busy time, streams overlapped
        if t > end:
            busy += t - max(s, end)
            end = t
    span = (max(t for _, t in intervals) - min(s for s, _ in intervals)) if intervals else 0.0
    rows = sorted(({"kernel": k[:160], "us_per_step": v[0] / steps, "launches_per_step": v[1] / steps}
                   for k, v in per_kernel.items()), key=lambda r: -r["us_per_step"])
    return {"profiled_steps": steps, "gpu_busy_ms_per_step": busy / steps / 1e3,
            "gpu_span_ms_per_step": span / steps / 1e3,
            "kernel_sum_ms_per_step": sum(r["us_per_step"] for r in rows) / 1e3, "kernels": rows[:40]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="synthetic:llama-3.1-8b")
    ap.add_argument("--ctx", default="128k")
    ap.add_argument("--attention", default="topk")
    ap.add_argument("--gpu-mem", default=None)
    ap.add_argument("--host-mem", default=None)
    ap.add_argument("--kv-dir", default=None)
    ap.add_argument("--prefill", default="exact")
    ap.add_argument("--prefetch", default="auto", choices=["auto", "hidden", "layer", "off"])
    ap.add_argument("--steps", type=int, default=5, help="profiled eager steps")
    ap.add_argument("--timed-steps", type=int, default=24)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    config = LcrunConfig.from_kwargs(model=a.model, ctx=a.ctx, attention=a.attention, gpu_mem=a.gpu_mem,
                                     host_mem=a.host_mem, kv_dir=a.kv_dir, prefill=a.prefill, prefetch=a.prefetch,
                                     prefill_chunk=8192, positions="true")
    llm = LLM(config=config, progress=False)
    n = llm.config.ctx_tokens - a.steps - a.timed_steps - 16
    torch.cuda.reset_peak_memory_stats()
    logits = llm.generator.prefill(random_prompt(llm.model_config.vocab_size, n))
    state = {"token": logits.argmax(-1, keepdim=True)}
    stepper = llm.generator.stepper

    def step() -> None:
        state["token"] = stepper.step(state["token"]).argmax(-1, keepdim=True)

    timed = time_steps(step, a.timed_steps)
    result = {"meta": run_metadata(), "settings": vars(a), "cache": type(llm.cache).__name__,
              "context": n, "cuda_graph": stepper.graph is not None,
              "decode_ms": warm_median(timed), "decode_ms_steps": timed,
              "peak_gpu_bytes": torch.cuda.max_memory_allocated(), **breakdown(llm, a.steps)}
    if hasattr(llm.cache, "report"):
        result["tiers"] = llm.cache.report()
    if hasattr(llm.cache, "close"):
        llm.cache.close()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"{a.ctx} {result['cache']}: {result['decode_ms']:.2f} ms/token (graph {result['cuda_graph']}), "
          f"eager GPU busy {result['gpu_busy_ms_per_step']:.2f} ms/step")
    for r in result["kernels"][:25]:
        print(f"  {r['us_per_step']:9.1f} us  x{r['launches_per_step']:5.0f}  {r['kernel'][:110]}")


if __name__ == "__main__":
    main()
