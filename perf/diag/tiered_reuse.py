"""Why does the tiered store's GPU page cache hit so rarely at 512K? Record, then replay.

Runs lcrun's decode at a long context (eager: no CUDA graph, so each step's selection can be
recorded; the kernels and so the selections are the same), saves the pages every layer selects
at every step, and replays them through cache models of the store's size per layer: direct-mapped
as the store maps pages (checked against the store's own hit counters), 4- and 16-way
set-associative, and fully associative LRU. Also the share of a step's top pages the previous
step selected. If the associative caches hit far more often, the cache's mapping is what to
change; if not, the selections themselves change too much between steps (random weights).

    python -m perf.diag.tiered_reuse --model synthetic:llama-3.1-8b --context 512k --steps 64 \
        --gpu-mem 24GiB --host-mem 72GiB --kv-dir /tmp/kv --out $OUT/tiered-reuse-512k.json
"""
from __future__ import annotations

import os

os.environ.setdefault("LCRUN_CUDA_GRAPH", "0")  # before lcrun builds a decode stepper

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402


from lcrun.api import LLM  # noqa: E402
from lcrun.config import LcrunConfig  # noqa: E402
from lcrun.profiling.bench import random_prompt  # noqa: E402
from lcrun.profiling.meta import run_metadata  # noqa: E402
from lcrun.units import parse_tokens  # noqa: E402
from perf.diag.selection_reuse import (SelectionRecorder, lru_hit_rate, overlap_with_previous_step,  # noqa: E402
                                       set_associative_hit_rate)


def record(llm: LLM, prompt: list[int], steps: int) -> dict:
    """Selections of ``steps`` decode steps after prefilling ``prompt`` (see diag_selection_reuse),
    with the store's own hit rate per step where it counts hits (the tiered store)."""
    cache = llm.cache
    recorder = cache.ops = SelectionRecorder(cache.ops)
    counters = getattr(getattr(cache, "stats", None), "counters", None)
    token = llm.generator.prefill(prompt).argmax(-1, keepdim=True)
    stepper = llm.generator.stepper
    measured, times = [], []
    with torch.inference_mode():
        for _ in range(steps):
            recorder.begin_step()
            before = counters[:2].tolist() if counters is not None else None
            t0 = time.perf_counter()
            token = stepper.step(token).argmax(-1, keepdim=True)
            if cache.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t0))
            if before is not None:
                selected, hits = (a - b for a, b in zip(counters[:2].tolist(), before))
                measured.append(hits / max(selected, 1))
            recorder.end_step()
    return dict(pages=recorder.pages, top=recorder.top, max_pages=int(cache.max_pages),
                measured_hit_rate=measured, step_ms_eager=times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="synthetic:llama-3.1-8b")
    ap.add_argument("--context", default="512k")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--gpu-mem", default=None)
    ap.add_argument("--host-mem", default=None)
    ap.add_argument("--kv-dir", default=None)
    ap.add_argument("--prefill", default="topk", choices=["exact", "topk"])
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--cache-slots", type=int, default=0,
                    help="slots per layer to model when the store is not tiered (all KV on the device)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    context = parse_tokens(args.context)
    config = LcrunConfig.from_kwargs(model=args.model, ctx=context + args.steps + 8, attention="topk",
                                     positions="true", prefill=args.prefill, prefetch="off", budget=args.budget,
                                     gpu_mem=args.gpu_mem, host_mem=args.host_mem, kv_dir=args.kv_dir)
    llm = LLM(config=config, progress=False)
    slots = int(getattr(llm.cache, "cache_slots", 0) or args.cache_slots)
    if not slots:
        raise SystemExit("the KV cache is all on the device: pass --cache-slots to model a page cache")
    rec = record(llm, random_prompt(llm.model_config.vocab_size, context, config.seed), args.steps)
    result = dict(meta=run_metadata(), settings=vars(args), cache=type(llm.cache).__name__, cache_slots_per_layer=slots,
                  max_pages=rec["max_pages"], step_ms_eager=rec["step_ms_eager"],
                  measured_hit_rate_all_pages=rec["measured_hit_rate"],
                  overlap_with_previous_step=overlap_with_previous_step(rec))
    # All selected pages (comparable with the store's counters) and top pages alone (what the
    # cache's size and mapping decide: sinks and window are selected every step).
    for label, top_only in (("all_pages", False), ("top_pages", True)):
        result[f"simulated_hit_rate_{label}"] = {
            "direct_mapped (the store)": set_associative_hit_rate(rec, slots, 1, top_only),
            "4-way": set_associative_hit_rate(rec, slots, 4, top_only),
            "16-way": set_associative_hit_rate(rec, slots, 16, top_only),
            "LRU": lru_hit_rate(rec, slots, top_only)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    torch.save(rec, Path(args.out).with_suffix(".selections.pt"))
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("simulated", "overlap", "cache_slots"))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
