"""The `lcrun bench` sweep: prefill tokens/s and decode ms/token over context lengths, for lcrun
under the run's caps and, in the same process on the same shape, for transformers' own Llama with
its GPU cache and its offloaded cache, so ratios come from one run on one machine.

Each measurement prefills ``context`` random token ids (chunked, as the runtime does), then times
single-token decode steps, each CUDA-synchronised; the reported decode time is the median over the
steps after the first ``WARMUP_STEPS`` (Triton compilation, cuBLAS setup, CUDA-graph capture), and
never over the first, cold step; ``decode_ms_p10``/``decode_ms_p90`` give the spread of the same
steps. ``decode_ms_late`` is the median of the second half of those steps: with a tiered KV store
the GPU page cache starts cold after prefill and fills over the first decode steps, so the two
differ while it warms.

Baselines: lcrun with dense attention (under the run's --gpu-mem, or uncapped with --no-dense-cap:
the honest dense reference), and transformers' Llama with its dynamic cache (eager), its offloaded
cache, or its static cache with a ``torch.compile``d decode step (CUDA graphs: its recommended fast
decode; its compilation runs in untimed warm-up steps, reported as ``compile_s``).
A context that does not fit is recorded as a row with an ``error``, and the sweep goes on.
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from lcrun.config import LcrunConfig
from lcrun.errors import ConfigError, LcrunError
from lcrun.profiling.meta import run_metadata

WARMUP_STEPS = 3
TRANSFORMERS_CACHES = ("dense", "offloaded", "static")
GPU_ONLY_CACHES = {"offloaded": "moves layers between GPU and host",
                   "static": "is timed with torch.compile's CUDA graphs"}
COMPILE_STEPS = 3  # untimed decode steps that compile and capture the static-cache decode
Log = Callable[[str], None]


@dataclass
class Sweep:
    """What to measure. ``contexts`` run lcrun with the given config; the others are the baselines."""

    contexts: list[int]
    steps: int = 32
    dense_contexts: list[int] = field(default_factory=list)       # lcrun, --attention dense
    dense_capped: bool = True                                     # under --gpu-mem as the swept rows are
    transformers: list[str] = field(default_factory=list)         # of TRANSFORMERS_CACHES
    transformers_contexts: list[int] | None = None                # default: contexts
    transformers_steps: int | None = None                         # default: steps
    transformers_capped: bool = True                              # under --gpu-mem as lcrun is
    trace: str | None = None                                      # Chrome trace of 3 steps, first context

    def __post_init__(self) -> None:
        if self.steps < 2 or (self.transformers_steps is not None and self.transformers_steps < 2):
            raise ConfigError("--steps must be at least 2 (the first, cold step is never counted)")
        unknown = sorted(set(self.transformers) - set(TRANSFORMERS_CACHES))
        if unknown:
            raise ConfigError(f"--transformers takes {', '.join(TRANSFORMERS_CACHES)}; got {', '.join(unknown)}")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def _warm_steps(ms: list[float]) -> list[float]:
    """The steps after the warm-up ones when there are enough to spare, else all but the first."""
    return ms[WARMUP_STEPS:] if len(ms) > 2 * WARMUP_STEPS else ms[1:]


def warm_median(ms: list[float]) -> float:
    """Median step time, never counting the first (cold) step; see _warm_steps."""
    warm = _warm_steps(ms)
    return statistics.median(warm) if warm else float("nan")


def step_stats(ms: list[float]) -> dict[str, Any]:
    """A row's decode times: the warm median, its spread (10th/90th percentiles of the same warm
    steps, interpolated) and every step as timed."""
    warm = _warm_steps(ms)
    p10, p90 = (statistics.quantiles(warm, n=10, method="inclusive")[i] for i in (0, 8)) if len(warm) > 1 \
        else (warm_median(ms),) * 2
    return {"decode_ms": warm_median(ms), "decode_ms_p10": p10, "decode_ms_p90": p90, "decode_ms_steps": ms}


def late_median(ms: list[float]) -> float:
    """Median of the second half of the warm steps (see the module docstring)."""
    warm = _warm_steps(ms)
    late = warm[len(warm) // 2:]
    return statistics.median(late) if late else float("nan")


def random_prompt(vocab_size: int, n: int, seed: int = 0) -> list[int]:
    """Random token ids: synthetic specs have no tokenizer, and decode speed does not depend on text."""
    return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _prefill_progress(label: str, total: int):
    """A tqdm bar on stderr for long prefills (tqdm switches itself off when stderr is no terminal)."""
    from tqdm import tqdm
    bar = tqdm(total=total, desc=f"prefill {label}", unit="tok", leave=False, file=sys.stderr, disable=None)

    def progress(done: int, _total: int) -> None:
        bar.update(done - bar.n)
        if done >= _total:
            bar.close()
    return progress


def _plan_summary(plan) -> dict | None:
    if plan is None:
        return None
    return {"page_size": plan.page_size, "gpu_slots": plan.gpu_slots, "host_pages": plan.host_pages,
            "nvme_pages": plan.nvme_pages, "prefill_chunk": plan.prefill_chunk, "all_on_gpu": plan.all_on_gpu,
            "predicted_decode_ms": 1e3 * plan.decode_s_per_token, "bottleneck": plan.bottleneck}


def time_steps(step: Callable[[], None], steps: int) -> list[float]:
    """ms per call of ``step``, each synchronised (the GPU's work, not just its launch)."""
    times = []
    for _ in range(steps):
        _sync()
        t = time.perf_counter()
        step()
        _sync()
        times.append(1e3 * (time.perf_counter() - t))
    return times


def bench_lcrun(config: LcrunConfig, context: int, steps: int, trace: str | None = None,
                log: Log | None = None) -> dict:
    """One lcrun measurement at ``context`` tokens with ``config``'s settings and caps. The row
    records --attention as asked (``attention_requested``), what it resolved to (``attention``:
    dense or topk, per context) and why (``attention_reason``); ``log`` gets that as one line."""
    from lcrun.api import LLM
    from lcrun.errors import TrainedWindowWarning
    _free()
    prompt_len = max(1, context)  # context 0: decode after one token (llama-bench's depth 0)
    cfg = dataclasses.replace(config, ctx=prompt_len + steps + 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainedWindowWarning)  # logged below as one line
        llm = LLM(config=cfg, progress=False)
    with llm:  # closed after each measurement: a sweep does not keep earlier contexts' pools alive
        return _measure(llm, config, context, steps, trace, log)


def _measure(llm, config: LcrunConfig, context: int, steps: int, trace: str | None, log: Log | None) -> dict:
    """bench_lcrun's row: ``context`` random ids prefilled into ``llm``, then ``steps`` decode steps timed."""
    if log is not None:
        log(f"{context} tokens: {llm.attention_choice.line()}")
        if llm.attention_warning:
            log(f"{context} tokens: warning: {llm.attention_warning}")
    prompt_len = max(1, context)  # context 0: decode after one token (llama-bench's depth 0)
    prompt = random_prompt(llm.model_config.vocab_size, prompt_len, config.seed)
    _sync()
    t0 = time.perf_counter()
    logits = llm.generator.prefill(prompt, _prefill_progress(f"{llm.attention} {context}", context))
    _sync()
    prefill_s = time.perf_counter() - t0
    state = {"token": logits.argmax(-1, keepdim=True)}
    stepper = llm.generator.stepper  # the CUDA-graph step the generator uses, where the cache allows

    def step() -> None:
        state["token"] = stepper.step(state["token"]).argmax(-1, keepdim=True)

    times = time_steps(step, steps)
    row: dict[str, Any] = {
        "impl": "lcrun", "attention": llm.attention, "attention_reason": llm.attention_reason,
        "attention_requested": config.attention, "context": context, "prefill_s": prefill_s,
        "prefill_tok_s": prompt_len / prefill_s, **step_stats(times), "decode_ms_late": late_median(times),
        "peak_gpu_bytes": _peak(), "gpu_cap_bytes": config.gpu_mem_bytes,
        "weight_bytes": llm.model.weight_bytes(), "weight_format": llm.model.weight_format(),
        "kv_cache_bytes": llm.cache.memory_bytes(),
        "cuda_graph": stepper.graph is not None, "plan": _plan_summary(llm.plan)}
    tiers = llm.cache.report()  # Gemma: the global layers' tiers
    if tiers:
        row["tiers"] = tiers
    if trace:
        row.update(_trace_steps(step, trace))
    return row


def _trace_steps(step: Callable[[], None], path: str) -> dict:
    from torch.profiler import ProfilerActivity

    from lcrun.profiling.trace import export_trace_gz, overlap_from_trace, profiling
    from lcrun.ranges import named_range
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profiling(activities) as prof:
        for _ in range(3):
            with named_range("decode_step"):
                step()
        _sync()
    out = export_trace_gz(prof, path if path.endswith(".gz") else path + ".gz")
    return {"trace": out.name, "overlap": overlap_from_trace(out)}


def _hf_config(cfg):
    import transformers
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_eps,
              rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
              max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings)
    classes = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
               "gemma3": transformers.Gemma3TextConfig}
    if cfg.arch == "gemma3":  # one rope per layer kind, the layer pattern, the query scale
        del kw["rope_theta"], kw["rope_scaling"]
        kw.update(layer_types=cfg.layer_types, sliding_window=cfg.sliding_window,
                  query_pre_attn_scalar=int(cfg.query_pre_attn_scalar), final_logit_softcapping=cfg.final_logit_softcapping,
                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                                                      **(cfg.rope_scaling or {})},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta}})
    if cfg.arch not in classes:
        raise ConfigError(f"no transformers baseline for architecture {cfg.arch!r}")
    return classes[cfg.arch](**kw)




def _model_config(config: LcrunConfig):
    from lcrun.runtime.loading import open_model
    return open_model(config.model)[0]


def _set_cap(device: torch.device, cap: int | None) -> None:
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total) if cap else 1.0, device)


def bench_transformers(config: LcrunConfig, context: int, steps: int, cache_kind: str, capped: bool = True) -> dict:
    """transformers' own Llama with random weights of the same shape, SDPA, and one of its caches:
    "dense" (dynamic, every layer's K/V on the GPU, eager), "offloaded" (layers parked in host
    memory) or "static" (preallocated, decode step under torch.compile with CUDA graphs)."""
    import transformers

    from lcrun.construct import resolve_device, resolve_dtype
    device = resolve_device(config.device)
    if cache_kind in GPU_ONLY_CACHES and device.type != "cuda":
        raise ConfigError(f"transformers' {cache_kind} cache {GPU_ONLY_CACHES[cache_kind]}: it needs a GPU")
    cfg = _model_config(config)
    cap = config.gpu_mem_bytes if capped else None
    _free()
    _set_cap(device, cap)
    torch.manual_seed(config.seed)
    progress = {"done": 0}
    row: dict[str, Any] = {"impl": f"transformers-{cache_kind}", "context": context,
                           "transformers": transformers.__version__, "gpu_cap_bytes": cap}
    try:
        with torch.device(device):
            ref = transformers.AutoModelForCausalLM.from_config(
                _hf_config(cfg), dtype=resolve_dtype(config.dtype, device), attn_implementation="sdpa").eval()
        row.update(transformers_decode(ref, cfg.vocab_size, max(1, context), steps, cache_kind, config.prefill_chunk,
                                       config.seed, device, compiled=cache_kind == "static", progress=progress),
                   peak_gpu_bytes=_peak())
        return row
    except torch.cuda.OutOfMemoryError as exc:
        row.update(error=f"out of GPU memory ({str(exc).splitlines()[0]})", prefill_tokens_done=progress["done"],
                   peak_gpu_bytes=_peak())
        return row
    finally:
        _set_cap(device, None)


def transformers_decode(ref, vocab_size: int, context: int, steps: int, cache_kind: str, chunk: int, seed: int,
                        device: torch.device, compiled: bool, progress: dict | None = None) -> dict:
    """Prefill ``context`` random ids into ``ref`` (a transformers causal LM) in chunks, then time
    ``steps`` greedy decode steps. cache_kind: dense/offloaded (DynamicCache) or static
    (StaticCache, explicit cache positions); ``compiled``: the decode step under
    torch.compile(mode="reduce-overhead"), compiled in COMPILE_STEPS untimed steps first."""
    import transformers
    progress = {} if progress is None else progress
    extra = COMPILE_STEPS if compiled else 0
    if cache_kind == "static":
        cache = transformers.StaticCache(config=ref.config, max_cache_len=context + steps + extra + 8)
    else:
        cache = transformers.DynamicCache(config=ref.config, offloading=cache_kind == "offloaded")
    ids = torch.tensor([random_prompt(vocab_size, context, seed)], device=device)
    bar = _prefill_progress(f"transformers-{cache_kind} {context}", context)
    _sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, context, chunk):  # chunked, as lcrun, so the prefill's activations fit
            n = min(chunk, context - s)
            out = ref(input_ids=ids[:, s:s + n], past_key_values=cache, use_cache=True, logits_to_keep=1,
                      cache_position=torch.arange(s, s + n, device=device))
            progress["done"] = s + n
            bar(s + n, context)
    _sync()
    prefill_s = time.perf_counter() - t0
    forward = torch.compile(ref.forward, mode="reduce-overhead", fullgraph=True) if compiled else ref.forward
    state = {"token": out.logits[:, -1:].argmax(-1), "pos": context}

    def step() -> None:
        with torch.no_grad():
            o = forward(input_ids=state["token"], past_key_values=cache, use_cache=True,
                        cache_position=torch.tensor([state["pos"]], device=device))
        state["token"] = o.logits[:, -1:].argmax(-1)
        state["pos"] += 1

    result: dict[str, Any] = {"prefill_s": prefill_s, "prefill_tok_s": context / prefill_s}
    if compiled:
        result["compile_s"] = sum(time_steps(step, COMPILE_STEPS)) / 1e3
    return {**result, **step_stats(time_steps(step, steps))}


def _guarded(label: str, log: Log, fn: Callable[[], dict], row: dict) -> dict:
    """Run one measurement; a context that does not fit becomes a row with its error, not the end."""
    try:
        result = fn()
    except (LcrunError, torch.cuda.OutOfMemoryError) as exc:
        result = {**row, "error": str(exc).splitlines()[0], "peak_gpu_bytes": _peak()}
    _free()
    if "error" in result:
        log(f"{label}: {result['error']}")
    else:
        log(f"{label}: prefill {result['prefill_tok_s']:,.0f} tok/s, decode {result['decode_ms']:.2f} ms/token")
    return result


def _label(row: dict, swept: dict | None = None, sep: str = " ") -> str:
    """transformers-static; lcrun topk; lcrun dense uncapped (a dense row without the swept rows' cap)."""
    if row["impl"] != "lcrun":
        return row["impl"]
    uncapped = row.get("gpu_cap_bytes") is None and swept is not None and swept.get("gpu_cap_bytes") is not None
    return sep.join(["lcrun", row["attention"]] + (["uncapped"] if uncapped else []))


def ratios(rows: list[dict], attention: str) -> list[dict]:
    """Baseline / lcrun, per context where both were measured (higher = lcrun faster). ``attention``
    is the swept config's --attention as asked (auto resolves per context: rows say to what)."""
    ours = {r["context"]: r for r in rows if r["impl"] == "lcrun"
            and r.get("attention_requested", r.get("attention")) == attention and "error" not in r}
    out = []
    for r in rows:
        mine = ours.get(r["context"])
        if r is mine or mine is None or "error" in r:
            continue
        out.append({"context": r["context"], "baseline": _label(r, mine, "-"),
                    "decode_speedup": r["decode_ms"] / mine["decode_ms"],
                    "prefill_speedup": mine["prefill_tok_s"] / r["prefill_tok_s"]})
    return out


WARMUP_CONTEXT = 4096


def resolved_attention(config: LcrunConfig, context: int, steps: int) -> str:
    """What --attention resolves to for a ``context`` row (dense or topk), through the plan a run
    makes (lcrun.construct.plan_run) but without loading weights; topk when that plan fails."""
    if config.attention != "auto":
        return config.attention
    from lcrun.construct import plan_run, resolve_device, resolve_dtype
    from lcrun.runtime.loading import open_model
    try:
        cfg = dataclasses.replace(config, ctx=max(1, context) + steps + 8)
        device = resolve_device(cfg.device)
        model_cfg, source = open_model(cfg.model)
        return plan_run(cfg, model_cfg, device, resolve_dtype(cfg.dtype, device), source=source).attention
    except LcrunError:
        return "topk"


def _warm_up(config: LcrunConfig, log: Log, contexts: list[int] | None = None, steps: int = 2) -> float | None:
    """Compile the Triton kernels on a short prompt first, so the first row's prefill time is
    not the compiler's (about 0.35 s of a 32K prefill on the H100). With --attention auto, warms
    each attention the swept ``contexts`` resolve to. Seconds spent, or None on a CPU."""
    if not torch.cuda.is_available():
        return None
    t0 = time.perf_counter()
    try:
        kinds = dict.fromkeys(resolved_attention(config, c, steps) for c in (contexts or [WARMUP_CONTEXT]))
        for attention in kinds:
            bench_lcrun(dataclasses.replace(config, attention=attention), WARMUP_CONTEXT, 2)
            _free()
    except Exception as exc:  # the real rows report their own errors
        log(f"warm-up failed: {exc}")
    _free()
    return round(time.perf_counter() - t0, 2)


def run_sweep(config: LcrunConfig, sweep: Sweep, log: Log = lambda _m: None,
              checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Every measurement of ``sweep``, in one JSON-ready document. ``checkpoint(document)`` is
    called after every measurement, so a sweep stopped by a time limit keeps what it finished."""
    rows: list[dict] = []
    doc = {"kind": "lcrun.bench", "meta": run_metadata(), "model": config.model,
           "model_name": _model_config(config).name, "settings": config.to_header(),
           "sweep": dataclasses.asdict(sweep), "warmup_steps": WARMUP_STEPS, "rows": rows, "ratios": []}

    def add(row: dict) -> None:
        rows.append(row)
        doc["ratios"] = ratios(rows, config.attention)
        if checkpoint is not None:
            checkpoint(doc)

    doc["warmup_s"] = _warm_up(config, log, sweep.contexts, sweep.steps)
    for i, context in enumerate(sweep.contexts):
        label = f"lcrun {config.attention} {context}"
        add(_guarded(label, log, lambda: bench_lcrun(config, context, sweep.steps, sweep.trace if i == 0 else None,
                                                     log=log),
                     {"impl": "lcrun", "attention": config.attention, "attention_requested": config.attention,
                      "context": context}))
    dense = dataclasses.replace(config, attention="dense", gpu_mem=config.gpu_mem if sweep.dense_capped else None)
    for context in sweep.dense_contexts:
        add(_guarded(f"lcrun dense {context}", log, lambda: bench_lcrun(dense, context, sweep.steps, log=log),
                     {"impl": "lcrun", "attention": "dense", "attention_requested": "dense", "context": context,
                      "gpu_cap_bytes": dense.gpu_mem_bytes}))
    t_steps = sweep.transformers_steps or sweep.steps
    for context in sweep.transformers_contexts or sweep.contexts:
        for kind in sweep.transformers:
            add(_guarded(f"transformers-{kind} {context}", log,
                         lambda: bench_transformers(config, context, t_steps, kind, sweep.transformers_capped),
                         {"impl": f"transformers-{kind}", "context": context}))
    return doc


def format_rows(rows: list[dict]) -> str:
    """The sweep as a plain-text table; decode ms is the warm median, p10-p90 its spread."""
    swept = next((r for r in rows if r["impl"] == "lcrun" and r.get("gpu_cap_bytes") is not None), None)
    lines = [f"{'impl':24} {'context':>8} {'prefill tok/s':>14} {'decode ms':>10} {'p10-p90 ms':>15} {'tok/s':>8} "
             f"{'peak GiB':>9} {'predicted ms':>13} {'error':>6}"]
    for r in rows:
        impl = _label(r, swept)
        if "error" in r:
            lines.append(f"{impl:24} {r['context']:>8}  {r['error']}")
            continue
        impl += f" {r['weight_format']}" if r["impl"] == "lcrun" and r.get("weight_format") else ""
        peak = f"{r['peak_gpu_bytes'] / 2**30:9.2f}" if r.get("peak_gpu_bytes") else f"{'-':>9}"
        spread = f"{r['decode_ms_p10']:.2f}-{r['decode_ms_p90']:.2f}"
        # the planner's prediction for the row (GPU runs), and how far the measurement is from it
        predicted = (r.get("plan") or {}).get("predicted_decode_ms")
        pred = f"{predicted:>13.2f} {(predicted - r['decode_ms']) / r['decode_ms']:>+6.0%}" if predicted else \
            f"{'-':>13} {'-':>6}"
        lines.append(f"{impl:24} {r['context']:>8} {r['prefill_tok_s']:>14,.0f} {r['decode_ms']:>10.2f} {spread:>15} "
                     f"{1e3 / r['decode_ms']:>8.1f} {peak} {pred}")
    return "\n".join(lines)
