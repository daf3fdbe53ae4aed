"""The `lcrun bench` sweep: prefill tokens/s and decode ms/token over context lengths, for lcrun
under the run's caps and, in the same process on the same shape, for transformers' own Llama with
its GPU cache and its offloaded cache, so ratios come from one run on one machine.

Each measurement prefills ``context`` random token ids (chunked, as the runtime does), then times
single-token decode steps, each CUDA-synchronised; the reported decode time is the median over the
steps after the first ``WARMUP_STEPS`` (Triton compilation, cuBLAS setup, CUDA-graph capture).
``decode_ms_late`` is the median of the second half of those steps: with a tiered KV store the GPU
page cache starts cold after prefill and fills over the first decode steps, so the two differ
while it warms.
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
from lcrun.runtime.layer_kind_cache import context_cache

WARMUP_STEPS = 3
TRANSFORMERS_CACHES = ("dense", "offloaded")
Log = Callable[[str], None]


@dataclass
class Sweep:
    """What to measure. ``contexts`` run lcrun with the given config; the others are the baselines."""

    contexts: list[int]
    steps: int = 32
    dense_contexts: list[int] = field(default_factory=list)       # lcrun, --attention dense
    transformers: list[str] = field(default_factory=list)         # "dense" and/or "offloaded"
    transformers_contexts: list[int] | None = None                # default: contexts
    transformers_steps: int | None = None                         # default: steps
    transformers_capped: bool = True                              # under --gpu-mem as lcrun is
    trace: str | None = None                                      # Chrome trace of 3 steps, first context

    def __post_init__(self) -> None:
        if self.steps < 1 or (self.transformers_steps is not None and self.transformers_steps < 1):
            raise ConfigError("--steps must be at least 1")
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
    """The steps after the warm-up ones, when there are enough to spare."""
    return ms[WARMUP_STEPS:] if len(ms) > 2 * WARMUP_STEPS else ms


def warm_median(ms: list[float]) -> float:
    """Median step time, leaving out the warm-up steps when there are enough to spare."""
    warm = _warm_steps(ms)
    return statistics.median(warm) if warm else float("nan")


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
    from lcrun.api import LLM, TrainedWindowWarning
    _free()
    cfg = dataclasses.replace(config, ctx=context + steps + 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainedWindowWarning)  # logged below as one line
        llm = LLM(config=cfg, progress=False)
    if log is not None:
        log(f"{context} tokens: {llm.attention_choice.line()}")
        if llm.attention_warning:
            log(f"{context} tokens: warning: {llm.attention_warning}")
    try:
        prompt = random_prompt(llm.model_config.vocab_size, context, config.seed)
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
            "prefill_tok_s": context / prefill_s, "decode_ms": warm_median(times),
            "decode_ms_late": late_median(times), "decode_ms_steps": times,
            "peak_gpu_bytes": _peak(), "gpu_cap_bytes": config.gpu_mem_bytes,
            "weight_bytes": llm.model.weight_bytes(), "kv_cache_bytes": llm.cache.memory_bytes(),
            "cuda_graph": stepper.graph is not None, "plan": _plan_summary(llm.plan)}
        paged = context_cache(llm.cache)  # Gemma: the global layers' cache has the tiers
        if hasattr(paged, "report"):
            row["tiers"] = paged.report()
        if trace:
            row.update(_trace_steps(step, trace))
        return row
    finally:
        if hasattr(llm.cache, "close"):
            llm.cache.close()
        del llm


def _trace_steps(step: Callable[[], None], path: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from lcrun.profiling.ranges import named_range
    from lcrun.profiling.trace import export_trace_gz, overlap_from_trace
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
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
    from lcrun.runtime.loading import default_model, open_source
    from lcrun.runtime.synthetic import is_synthetic, synthetic_config
    spec = config.model or default_model()
    return synthetic_config(spec) if is_synthetic(spec) else open_source(spec).config


def _set_cap(device: torch.device, cap: int | None) -> None:
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total) if cap else 1.0, device)


def bench_transformers(config: LcrunConfig, context: int, steps: int, cache_kind: str, capped: bool = True) -> dict:
    """transformers' own Llama with random weights of the same shape, SDPA, and its dynamic
    ("dense": every layer's K/V on the GPU) or offloaded cache (layers parked in host memory)."""
    import transformers

    from lcrun.api import resolve_device, resolve_dtype
    device = resolve_device(config.device)
    if cache_kind == "offloaded" and device.type != "cuda":
        raise ConfigError("transformers' offloaded cache moves layers between GPU and host: it needs a GPU")
    cfg = _model_config(config)
    cap = config.gpu_mem_bytes if capped else None
    _free()
    _set_cap(device, cap)
    torch.manual_seed(config.seed)
    done = 0
    row: dict[str, Any] = {"impl": f"transformers-{cache_kind}", "context": context,
                           "transformers": transformers.__version__, "gpu_cap_bytes": cap}
    try:
        with torch.device(device):
            ref = transformers.AutoModelForCausalLM.from_config(
                _hf_config(cfg), dtype=resolve_dtype(config.dtype, device), attn_implementation="sdpa").eval()
        cache = transformers.DynamicCache(config=ref.config, offloading=cache_kind == "offloaded")
        ids = torch.tensor([random_prompt(cfg.vocab_size, context, config.seed)], device=device)
        chunk = config.prefill_chunk
        progress = _prefill_progress(f"transformers-{cache_kind} {context}", context)
        _sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            for s in range(0, context, chunk):  # chunked, as lcrun, so the prefill's activations fit
                out = ref(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
                done = min(context, s + chunk)
                progress(done, context)
        _sync()
        prefill_s = time.perf_counter() - t0
        state = {"token": out.logits[:, -1:].argmax(-1)}

        def step() -> None:
            with torch.no_grad():
                o = ref(input_ids=state["token"], past_key_values=cache, use_cache=True)
            state["token"] = o.logits[:, -1:].argmax(-1)

        times = time_steps(step, steps)
        row.update(prefill_s=prefill_s, prefill_tok_s=context / prefill_s, decode_ms=warm_median(times),
                   decode_ms_steps=times, peak_gpu_bytes=_peak())
        return row
    except torch.cuda.OutOfMemoryError as exc:
        row.update(error=f"out of GPU memory ({str(exc).splitlines()[0]})", prefill_tokens_done=done,
                   peak_gpu_bytes=_peak())
        return row
    finally:
        _set_cap(device, None)


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
        out.append({"context": r["context"], "baseline": r["impl"] + (f"-{r['attention']}" if r["impl"] == "lcrun" else ""),
                    "decode_speedup": r["decode_ms"] / mine["decode_ms"],
                    "prefill_speedup": mine["prefill_tok_s"] / r["prefill_tok_s"]})
    return out


WARMUP_CONTEXT = 4096


def resolved_attention(config: LcrunConfig, context: int, steps: int) -> str:
    """What --attention resolves to for a ``context`` row (dense or topk), through the plan a run
    makes (lcrun.api.plan_run) but without loading weights; topk when that plan fails."""
    if config.attention != "auto":
        return config.attention
    from lcrun.api import plan_run, resolve_device, resolve_dtype
    try:
        cfg = dataclasses.replace(config, ctx=context + steps + 8).resolve()
        device = resolve_device(cfg.device)
        return plan_run(cfg, _model_config(cfg), device, resolve_dtype(cfg.dtype, device)).attention
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
    config.resolve()
    rows: list[dict] = []
    doc = {"kind": "lcrun.bench", "meta": run_metadata(), "model": config.model, "settings": config.to_header(),
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
    dense = dataclasses.replace(config, attention="dense")
    for context in sweep.dense_contexts:
        add(_guarded(f"lcrun dense {context}", log, lambda: bench_lcrun(dense, context, sweep.steps, log=log),
                     {"impl": "lcrun", "attention": "dense", "attention_requested": "dense", "context": context}))
    t_steps = sweep.transformers_steps or sweep.steps
    for context in sweep.transformers_contexts or sweep.contexts:
        for kind in sweep.transformers:
            add(_guarded(f"transformers-{kind} {context}", log,
                         lambda: bench_transformers(config, context, t_steps, kind, sweep.transformers_capped),
                         {"impl": f"transformers-{kind}", "context": context}))
    return doc


def format_rows(rows: list[dict]) -> str:
    """The sweep as a plain-text table."""
    lines = [f"{'impl':24} {'context':>8} {'prefill tok/s':>14} {'decode ms':>10} {'tok/s':>8} {'peak GiB':>9}"]
    for r in rows:
        impl = r["impl"] + (f" {r['attention']}" if r["impl"] == "lcrun" else "")
        if "error" in r:
            lines.append(f"{impl:24} {r['context']:>8}  {r['error']}")
            continue
        peak = f"{r['peak_gpu_bytes'] / 2**30:9.2f}" if r.get("peak_gpu_bytes") else f"{'-':>9}"
        lines.append(f"{impl:24} {r['context']:>8} {r['prefill_tok_s']:>14,.0f} {r['decode_ms']:>10.2f} "
                     f"{1e3 / r['decode_ms']:>8.1f} {peak}")
    return "\n".join(lines)
