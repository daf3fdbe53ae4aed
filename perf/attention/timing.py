"""Timing helpers of `python -m perf.attention`: do_bench medians (wall clock without CUDA), CUDA-graph
capture of a callable, achieved bandwidth, and the device-to-device copy rate (the ceiling)."""
from __future__ import annotations

import time

import torch
import triton.testing


def time_ms(fn, args) -> dict:
    """Median (and 20/80 %) milliseconds of fn. Without CUDA the kernels run in Triton's interpreter
    (the --smoke run), whose times mean nothing: fn runs once, its wall time fills all three."""
    if torch.cuda.is_available():
        med, lo, hi = triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "p20_ms": lo, "p80_ms": hi}
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return {"ms": ms, "p20_ms": ms, "p80_ms": ms}


def graph_of(fn):
    """fn captured in a CUDA graph (warm-up first: compiles kernels outside the capture), or None."""
    if not torch.cuda.is_available():
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # noqa: BLE001 - reported, not fatal for the dense baselines
        print(f"  (graph capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
        torch.cuda.synchronize()
        return None
    return graph.replay


def with_bandwidth(timing: dict, bytes_moved: int) -> dict:
    return {**timing, "bytes": bytes_moved, "GBps": bytes_moved / (timing["ms"] * 1e-3) / 1e9}


def copy_bandwidth(args) -> dict:
    """Device-to-device copy of 1 GiB (CPU: 64 MiB): bytes read + written per second."""
    n = (1 << 30) if torch.cuda.is_available() else (64 << 20)
    dev = device()
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    timing = time_ms(lambda: dst.copy_(src), args)
    return with_bandwidth(timing, 2 * n)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
