"""A profiled generation: what `lcrun profile` measures, as one JSON-ready dict.

1. prefill ``prompt_tokens`` (random ids unless given), timing every chunk: throughput over the prompt;
2. a few eager decode steps to warm up (Triton compiles, cuBLAS sets up);
3. ``steps`` eager decode steps under the torch profiler, each inside a ``decode_step`` range, with
   CUDA graphs off (a replayed graph is one opaque launch: no per-range attribution), exported as a
   Chrome trace and split, from that trace, into the runtime's named ranges
   (``lcrun.profiling.attribution``);
4. ``timed_steps`` steps the way generation runs them (CUDA-graph replay where the cache allows),
   unprofiled: the real ms/token beside the profiled split.
The cache's counters (``lcrun.profiling.counters``) are sampled after every decode step, and the
links' peaks (``lcrun.profiling.links.measure_peaks``) are measured before the prefill.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lcrun.errors import ConfigError, LcrunError
from lcrun.profiling import attribution, counters, links
from lcrun.profiling.bench import WARMUP_STEPS, random_prompt, warm_median
from lcrun.profiling.meta import run_metadata
from lcrun.profiling.trace import export_trace_gz, profiling
from lcrun.ranges import named_range
from lcrun.runtime.layer_kind_cache import context_cache

TRACE_NAME = "trace.json.gz"
Log = Callable[[str], None]


@dataclass
class ProfileOptions:
    prompt_tokens: int
    steps: int = 8            # profiled eager steps
    timed_steps: int = 32     # unprofiled steps, as generation runs them
    warmup_steps: int = 2
    prompt_ids: list[int] | None = None
    measure_peaks: bool = True  # time a copy per link first (about a second on a GPU)

    def decode_tokens(self) -> int:
        return self.warmup_steps + self.steps + self.timed_steps

    def check(self, capacity: int) -> None:
        if self.steps < 1 or self.timed_steps < 1:
            raise ConfigError("--steps and --timed-steps must be at least 1")
        if self.prompt_tokens < 1:
            raise ConfigError(f"no room for a prompt: {self.decode_tokens()} decode steps need most of --ctx "
                              f"{capacity}; raise --ctx or lower --steps/--timed-steps" if self.prompt_ids is None
                              and self.prompt_tokens <= 0 else "--prompt-tokens must be at least 1")
        need = self.prompt_tokens + self.decode_tokens() + 1
        if need > capacity:
            raise ConfigError(f"{self.prompt_tokens} prompt tokens and {self.decode_tokens()} decode steps need "
                              f"a context of {need} tokens, over --ctx {capacity} by {need - capacity}: "
                              "raise --ctx or lower --prompt-tokens")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill(llm, ids: list[int], log: Log) -> dict:
    """Prefill with every chunk timed (synchronised in the progress callback)."""
    points: list[dict] = []
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done == 0:  # the start, before any chunk: t0 is taken
            return
        _sync(llm.device)
        points.append({"tokens": done, "seconds": time.perf_counter() - t0})
        if len(points) % 16 == 0 or done >= total:
            log(f"prefill {done:,}/{total:,} tokens, {done / points[-1]['seconds']:,.0f} tok/s")

    _sync(llm.device)
    logits = llm.generator.prefill(ids, progress)
    _sync(llm.device)
    seconds = time.perf_counter() - t0
    prev_t, prev_n = 0.0, 0
    for p in points:
        dt = p["seconds"] - prev_t
        p["chunk_tok_s"] = (p["tokens"] - prev_n) / dt if dt > 0 else None
        prev_t, prev_n = p["seconds"], p["tokens"]
    # Layer-major prefill (the tiered store) reports once per layer, each over the whole prompt.
    mode = "layer-major" if llm.cache.layerwise_prefill else "chunked"
    return {"logits": logits, "tokens": len(ids), "seconds": seconds, "tok_s": len(ids) / seconds, "mode": mode,
            "points": points}


def _plan_info(llm) -> dict:
    """The plan this run used or, on the CPU (where no plan places anything), the one `lcrun plan`
    shows for the same settings, marked so."""
    from lcrun.construct import plan_run
    from lcrun.planner import format_plan
    plan, used = llm.plan, True
    if plan is None:
        used = False
        try:
            plan = plan_run(llm.config, llm.model_config, llm.device, llm.dtype, cpu_plan=True).plan
        except LcrunError as exc:
            return {"used_by_run": False, "error": str(exc)}
    why = "" if used else ("a CPU run places its KV cache without the planner; shown: the plan `lcrun plan` makes "
                           "for the same settings")
    return {"used_by_run": used, "note": why, "text": format_plan(plan), "plan": plan.to_dict()}


def _model_info(llm) -> dict:
    cfg = llm.model_config
    return {"spec": str(llm.model_spec), "name": cfg.name, "arch": cfg.arch, "layers": cfg.num_layers,
            "hidden_size": cfg.hidden_size, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "parameters": cfg.num_parameters(), "weight_bytes": llm.model.weight_bytes(),
            "device": str(llm.device), "dtype": str(llm.dtype).replace("torch.", "")}


def run_profile(llm, opts: ProfileOptions, out_dir: Path, log: Log = lambda _m: None) -> dict:
    """Run the profiled generation on ``llm`` (fresh: nothing cached) and return its data; the
    Chrome trace is written to ``out_dir / TRACE_NAME``."""
    from torch.profiler import ProfilerActivity

    from lcrun.runtime.decode_graph import DecodeStepper
    from lcrun.runtime.sampling import Sampler, SamplingParams

    opts.check(llm.cache.capacity)
    out_dir.mkdir(parents=True, exist_ok=True)
    peaks = None
    if opts.measure_peaks:
        log("measuring link peaks (copies timed per link)")
        peaks = links.measure_peaks(llm.device)
    ids = opts.prompt_ids if opts.prompt_ids is not None else random_prompt(
        llm.model_config.vocab_size, opts.prompt_tokens, llm.config.seed)
    pre = _prefill(llm, ids, log)
    cache, device = llm.cache, llm.device
    paged = context_cache(cache)  # where pages and counters live (Gemma: the global layers' cache)
    sampler = Sampler(SamplingParams(temperature=0.0), device)
    state = {"token": sampler(pre.pop("logits")).reshape(1)}
    eager = DecodeStepper(llm.model, cache, use_graph=False)  # profiled steps: one launch per kernel

    samples, phases = [counters.read_counters(paged)[0]], []

    def run_steps(stepper, n: int, phase: str, wall: list[float], profiled: bool = False) -> None:
        for _ in range(n):
            _sync(device)
            t = time.perf_counter()
            with named_range(attribution.STEP_RANGE) if profiled else nullcontext():
                state["token"] = sampler(stepper.step(state["token"])).reshape(1)
            _sync(device)
            wall.append(1e3 * (time.perf_counter() - t))
            samples.append(counters.read_counters(paged)[0])
            phases.append(phase)

    warm: list[float] = []
    run_steps(eager, opts.warmup_steps, "warm-up (eager)", warm)
    log(f"profiling {opts.steps} eager decode steps")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    profiled: list[float] = []
    with profiling(activities) as prof:
        run_steps(eager, opts.steps, "profiled (eager)", profiled, profiled=True)
    trace = export_trace_gz(prof, out_dir / TRACE_NAME)
    del prof
    split = attribution.split_steps(trace, profiled)

    stepper = llm.generator.stepper  # as generation runs: CUDA-graph replay where the cache allows
    log(f"timing {opts.timed_steps} decode steps as generation runs them")
    timed: list[float] = []
    run_steps(stepper, opts.timed_steps, "timed (graph)" if stepper.use_graph else "timed (eager)", timed)
    source = counters.read_counters(paged)[1]
    series = counters.per_step(samples)
    for row, phase in zip(series, phases):
        row["phase"] = phase
    timed_ms = warm_median(timed)
    link_info = links.link_rows(llm, timed_ms / 1e3, [r for r, p in zip(series, phases) if p.startswith("timed")],
                                peaks)
    return {
        "kind": "lcrun.profile", "meta": run_metadata(), "header": llm.config.to_header(), "model": _model_info(llm),
        "cache": type(cache).__name__, "plan": _plan_info(llm),
        "prefill": pre,
        "decode": {**attribution.decode_summary(split),
                   "warmup_ms": warm, "profiled_ms": profiled, "profiled_ms_median": warm_median(profiled),
                   "timed_ms": timed, "timed_ms_median": timed_ms, "timed_warmup_steps": WARMUP_STEPS,
                   "cuda_graph": getattr(stepper, "graph", None) is not None},
        "counters": {"source": source, "steps": series,
                     "final_report": paged.report() or None},
        "links": link_info,
        "trace": trace.name,
    }
