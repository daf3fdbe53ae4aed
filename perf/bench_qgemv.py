"""Quantized decode GEMV bandwidth on Llama-3.1-8B shapes, against the device's measured copy bandwidth.

    python -m perf.bench_qgemv --formats Q4_0,Q8_0,Q4_K --out OUT.json

Per (format, shape): the default launch config and a small sweep (rows per program, bytes per row
per iteration with the warps that go with them, split-K), each timed as decode runs it: many calls
captured in one CUDA graph (launched one by one from Python, a call this short measures the
launch, not the kernel), cycling through enough copies of the weight to exceed the L2 cache so
every call reads from HBM. GB/s counts the weight's bytes once per call (what a decode step must
read). Beside it: torch's bf16 GEMV on the same shape, and prefill's dequantize-to-scratch +
matmul at T tokens against a bf16 matmul.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lcrun.kernels.quant.kernels import dequantize, gemv_config, qgemv
from lcrun.kernels.quant.quantize import random_quant
from lcrun.profiling.meta import run_metadata
from perf.attention.timing import graph_of

# (N, K): w_down, one of gate/up, fused gate|up as lcrun runs it, fused qkv, the output head
SHAPES = [(4096, 14336), (14336, 4096), (28672, 4096), (6144, 4096), (128256, 4096)]
L2_FLUSH_BYTES = 512 << 20  # cycle weights through this much memory (H200 L2: 50 MB)


def timed(fn, calls: int) -> float:
    """Mean ms per call over ``calls`` (after a warm-up), timed by CUDA events around eager calls
    (for the long calls: copies, prefill matmuls)."""
    for _ in range(3):
        fn(0)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(calls):
        fn(i)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def timed_graph(fn, calls: int, replays: int = 5) -> float:
    """Median ms per call of ``calls`` calls captured in one CUDA graph (perf.attention's graph_of:
    an eager warm-up compiles first), over ``replays`` timed replays."""
    replay = graph_of(lambda: [fn(i) for i in range(calls)])
    if replay is None:
        raise RuntimeError("the GEMV calls could not be captured in a CUDA graph (see the line above)")
    replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(dev: torch.device) -> float:
    """Device copy bandwidth in bytes/s counting bytes read + written (1 GiB buffers)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = timed(lambda i: b.copy_(a), 20)
    return 2 * a.numel() / (ms * 1e-3)


def read_bandwidth(dev: torch.device) -> float:
    """Read-only bandwidth: a sum over 1 GiB of fp32 (bytes read per second)."""
    a = torch.ones(1 << 28, dtype=torch.float32, device=dev)
    ms = timed(lambda i: a.sum(), 20)
    return a.numel() * 4 / (ms * 1e-3)


def bench_shape(fmt: str, n: int, k: int, dev: torch.device, calls: int, sweep: bool, prefill_t: int) -> dict:
    gen = torch.Generator(device=dev).manual_seed(0)
    w0 = random_quant(fmt, n, k, dev, gen)
    copies = max(1, -(-L2_FLUSH_BYTES // w0.nbytes))
    ws = [w0] + [random_quant(fmt, n, k, dev, gen) for _ in range(copies - 1)]
    x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    sm = torch.cuda.get_device_properties(dev).multi_processor_count
    default = gemv_config(n, k, sm)
    configs = [default]
    if sweep:  # each (BLOCK_N, BLOCK_P, warps) compiles once per format; splits are runtime
        for bn in (8, 16, 32):
            for bp in (128, 256, 512):
                for warps in (4, 8):
                    for splits in sorted({1, 2, 4, default[2]}):
                        if (k // 2) // splits >= bp:
                            configs.append((bn, bp, splits, warps))
    rows = []
    for cfg in dict.fromkeys(configs):
        ms = timed_graph(lambda i: qgemv(x, ws[i % copies], cfg), calls)
        eager_ms = timed(lambda i: qgemv(x, ws[i % copies], cfg), calls) if cfg == default else None
        rows.append({"config": list(cfg), "ms": ms, "gb_s": w0.nbytes / (ms * 1e-3) / 1e9,
                     **({"eager_launch_ms": eager_ms} if eager_ms is not None else {})})
    best = min(rows, key=lambda r: r["ms"])
    dense = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(max(1, -(-L2_FLUSH_BYTES // (n * k * 2))))]
    bf16_ms = timed_graph(lambda i: torch.nn.functional.linear(x, dense[i % len(dense)]), calls)
    xt = torch.randn(prefill_t, k, device=dev, dtype=torch.bfloat16)
    scratch_ms = timed(lambda i: torch.nn.functional.linear(xt, dequantize(ws[i % copies], torch.bfloat16)), 10)
    dense_mm_ms = timed(lambda i: torch.nn.functional.linear(xt, dense[i % len(dense)]), 10)
    deq_ms = timed(lambda i: dequantize(ws[i % copies], torch.bfloat16), 10)
    return {"format": fmt, "n": n, "k": k, "weight_bytes": w0.nbytes, "default": rows[0], "best": best,
            "sweep": rows if sweep else None, "bf16_gemv_ms": bf16_ms,
            "bf16_gemv_gb_s": n * k * 2 / (bf16_ms * 1e-3) / 1e9,
            "prefill_t": prefill_t, "prefill_scratch_ms": scratch_ms, "prefill_dequant_ms": deq_ms,
            "prefill_bf16_ms": dense_mm_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="Q4_0,Q8_0,Q4_K,Q6_K,Q5_K,Q4_1")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--prefill-t", type=int, default=2048)
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args()
    dev = torch.device("cuda")
    copy_bw, read_bw = copy_bandwidth(dev), read_bandwidth(dev)
    print(f"device copy {copy_bw / 1e9:.0f} GB/s (read + write), read {read_bw / 1e9:.0f} GB/s")
    results = []
    for fmt in args.formats.split(","):
        for n, k in SHAPES:
            r = bench_shape(fmt, n, k, dev, args.calls, not args.no_sweep, args.prefill_t)
            torch.cuda.empty_cache()  # the shape's weight copies are gone with its frame
            r["best_vs_copy"] = r["best"]["gb_s"] * 1e9 / copy_bw
            r["default_vs_copy"] = r["default"]["gb_s"] * 1e9 / copy_bw
            results.append(r)
            print(f"{fmt:5} {n:>6}x{k:<6} default {r['default']['ms'] * 1e3:7.1f} us {r['default']['gb_s']:6.0f} GB/s "
                  f"({r['default_vs_copy']:.0%} of copy)  best {r['best']['gb_s']:6.0f} GB/s "
                  f"({r['best_vs_copy']:.0%}) {r['best']['config']}  bf16 gemv {r['bf16_gemv_gb_s']:6.0f} GB/s  "
                  f"prefill T={r['prefill_t']}: scratch {r['prefill_scratch_ms']:.2f} ms vs bf16 "
                  f"{r['prefill_bf16_ms']:.2f} ms", flush=True)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": "lcrun.qgemv", "meta": run_metadata(), "copy_bytes_per_s": copy_bw,
                                "read_bytes_per_s": read_bw, "rows": results,
                                "target": "decode GEMV >= 70% of the measured copy bandwidth"}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
