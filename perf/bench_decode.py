"""Decode ms/token and prefill time of lcrun beside transformers, on the same shape, in one run.

    python perf/bench_decode.py --model synthetic:llama-3.1-8b --contexts 4096 --transformers

Each context: prefill that many random tokens (lcrun: chunked), then time single-token decode
steps (CUDA-synchronised wall time per step; median reported). Peak GPU memory per run.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from perf.common import median, write_result  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def overlap_from_trace(path: str) -> dict:
    """From a Chrome trace of the torch profiler: GPU kernel time per stream, and how much of the
    side streams' kernel time ran while a kernel of the main (busiest) stream was running."""
    import json
    events = json.load(open(path))["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy") and "dur" in e]
    by_stream: dict[int, list[tuple[float, float]]] = {}
    for e in kernels:
        by_stream.setdefault(e["args"].get("stream", -1), []).append((e["ts"], e["ts"] + e["dur"]))
    if not by_stream:
        return {}
    busy = {s: sum(b - a for a, b in iv) for s, iv in by_stream.items()}
    main = max(busy, key=busy.get)
    main_iv = sorted(by_stream[main])
    overlapped = 0.0
    for s, iv in by_stream.items():
        if s == main:
            continue
        for a, b in iv:
            for c, d in main_iv:  # fine for a few thousand kernels
                if c >= b:
                    break
                overlapped += max(0.0, min(b, d) - max(a, c))
    side_total = sum(v for s, v in busy.items() if s != main)
    return {"main_stream": main, "kernel_us_by_stream": busy, "side_us": side_total,
            "side_us_overlapping_main": overlapped,
            "side_overlap_fraction": overlapped / side_total if side_total else None}


def bench_lcrun(model: str, context: int, steps: int, settings: dict, trace: str | None = None) -> dict:
    from lcrun import LLM
    _reset_peak()
    llm = LLM(model, ctx=context + steps + 8, progress=False, **settings)
    vocab = llm.model_config.vocab_size
    prompt = torch.randint(0, vocab, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    _sync()
    t0 = time.perf_counter()
    logits = llm.generator.prefill(prompt)
    _sync()
    prefill_s = time.perf_counter() - t0
    token = torch.tensor([int(logits.argmax())], device=llm.device)
    stepper = llm.generator.stepper  # the CUDA-graph step the generator uses, where the cache allows
    times = []
    for _ in range(steps):
        _sync()
        t = time.perf_counter()
        logits = stepper.step(token)
        token = logits.argmax(-1, keepdim=True)
        _sync()
        times.append(time.perf_counter() - t)
    warm = times[3:] if len(times) > 6 else times
    extra = {}
    if trace:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                with torch.profiler.record_function("decode_step"):
                    logits = stepper.step(token)
                    token = logits.argmax(-1, keepdim=True)
            _sync()
        prof.export_chrome_trace(trace)
        extra["overlap"] = overlap_from_trace(trace)
        import gzip, os, shutil  # noqa: E401  (Perfetto and chrome://tracing open .json.gz)
        with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(trace)
        extra["trace"] = os.path.basename(trace) + ".gz"
    if hasattr(llm.cache, "report"):
        extra["tiers"] = llm.cache.report()
    if getattr(llm, "plan", None) is not None:
        p = llm.plan
        extra["plan"] = {"page_size": p.page_size, "gpu_slots": p.gpu_slots, "host_pages": p.host_pages,
                         "nvme_pages": p.nvme_pages, "prefill_chunk": p.prefill_chunk,
                         "predicted_decode_ms": 1e3 * p.decode_s_per_token, "all_on_gpu": p.all_on_gpu}
    out = {"impl": "lcrun", "context": context, "settings": settings, **extra, "prefill_s": prefill_s,
           "prefill_tok_s": context / prefill_s, "decode_ms": 1e3 * median(warm),
           "decode_ms_all": [1e3 * t for t in times], "peak_gpu_bytes": _peak(),
           "weight_bytes": llm.model.weight_bytes(), "kv_cache_bytes": llm.cache.memory_bytes(),
           "cuda_graph": stepper.graph is not None}
    if hasattr(llm.cache, "close"):
        llm.cache.close()
    del llm, logits
    return out


def _hf_config(cfg):
    import transformers
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_eps,
              rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
              max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[cfg.arch]
    return cls(**kw)


def bench_transformers(model: str, context: int, steps: int, offloaded: bool, prefill_chunk: int) -> dict:
    """transformers' own Llama with random bf16 weights, SDPA, its dynamic or offloaded cache."""
    import transformers
    from lcrun.runtime.synthetic import synthetic_config
    cfg = synthetic_config(model)
    _reset_peak()
    with torch.device("cuda"):
        ref = transformers.AutoModelForCausalLM.from_config(
            _hf_config(cfg), dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    cache = transformers.DynamicCache(config=ref.config, offloading=True) if offloaded else transformers.DynamicCache(
        config=ref.config)
    ids = torch.randint(0, cfg.vocab_size, (1, context), device="cuda")
    _sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, context, prefill_chunk):  # chunked, as lcrun, so the prefill fits
            out = ref(input_ids=ids[:, s:s + prefill_chunk], past_key_values=cache, use_cache=True,
                      logits_to_keep=1)
    _sync()
    prefill_s = time.perf_counter() - t0
    token = out.logits[:, -1:].argmax(-1)
    times = []
    with torch.no_grad():
        for _ in range(steps):
            _sync()
            t = time.perf_counter()
            out = ref(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            _sync()
            times.append(time.perf_counter() - t)
    warm = times[3:] if len(times) > 6 else times
    res = {"impl": "transformers-offloaded" if offloaded else "transformers", "context": context,
           "transformers": transformers.__version__, "prefill_s": prefill_s, "prefill_tok_s": context / prefill_s,
           "decode_ms": 1e3 * median(warm), "decode_ms_all": [1e3 * t for t in times], "peak_gpu_bytes": _peak()}
    del ref, cache, out
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:llama-3.1-8b")
    ap.add_argument("--contexts", default="4096", help="comma-separated token counts")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--attention", default="dense")
    ap.add_argument("--prefill-chunk", type=int, default=4096)
    ap.add_argument("--gpu-mem", default=None)
    ap.add_argument("--host-mem", default=None)
    ap.add_argument("--kv-dir", default=None)
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--trace", default=None, help="write a Chrome trace of 3 decode steps (first context)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--transformers", action="store_true", help="also time transformers' dynamic cache")
    ap.add_argument("--transformers-offloaded", action="store_true", help="also time its offloaded cache")
    ap.add_argument("--name", default="bench_decode")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from lcrun.units import parse_tokens
    settings = {"attention": args.attention, "prefill_chunk": args.prefill_chunk, "dtype": args.dtype}
    for key in ("gpu_mem", "host_mem", "kv_dir", "budget"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    rows = []
    for context in [parse_tokens(c) for c in args.contexts.split(",")]:
        rows.append(bench_lcrun(args.model, context, args.steps, settings, args.trace if not rows else None))
        if args.transformers:
            rows.append(bench_transformers(args.model, context, args.steps, False, args.prefill_chunk))
        if args.transformers_offloaded:
            rows.append(bench_transformers(args.model, context, args.steps, True, args.prefill_chunk))
    path = write_result(args.name, {"model": args.model, "args": vars(args), "rows": rows}, args.out)
    print(f"{'impl':24} {'context':>8} {'prefill s':>10} {'decode ms':>10} {'tok/s':>8} {'peak GiB':>9}")
    for r in rows:
        peak = r["peak_gpu_bytes"] / 2**30 if r["peak_gpu_bytes"] else float("nan")
        print(f"{r['impl']:24} {r['context']:>8} {r['prefill_s']:>10.2f} {r['decode_ms']:>10.2f} "
              f"{1e3 / r['decode_ms']:>8.1f} {peak:>9.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
