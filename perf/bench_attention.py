"""Decode attention for ONE layer: top-k page path (score + select + sparse attend) vs dense
flash decoding over the whole context, at Llama-3.1-8B shapes.

    python perf/bench_attention.py                      # H100: 32K, 128K, 512K, 1M
    python perf/bench_attention.py --contexts 32k,128k --budget 4096 --page 64
    python perf/bench_attention.py --smoke              # tiny shapes; CPU interpreter without CUDA

    python perf/bench_attention.py --tune               # time kernel variants first, then benchmark the best

The sparse path is timed as the runtime runs it (fused top-k + assembly, lcrun.kernels.topk) and,
beside it, with the previous torch.topk + assembly selection ("old").

Times are medians of triton.testing.do_bench (L2 flushed before each run), eager and replayed from a
CUDA graph (the runtime captures the decode step, so graph times are what it will see). Achieved
bandwidth = bytes the kernel must read / time; the device-to-device copy bandwidth of the same run
(bytes read + written) is the practical ceiling. Correctness is checked first; a mismatch aborts.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton  # noqa: E402
import triton.testing  # noqa: E402,F401

from lcrun.kernels import plan_selection, reference, select_with_plan  # noqa: E402
from lcrun.kernels.abstracts import update_abstracts  # noqa: E402
from lcrun.kernels.chunk_abstracts import chunk_abstracts_like, select_top_pages_hier, update_chunk_abstracts  # noqa: E402,E501
from lcrun.kernels.score import score_pages  # noqa: E402
from lcrun.kernels.select_kernels import assemble_selection, selection_bounds  # noqa: E402
from lcrun.kernels.sparse_decode import decode_splits, sparse_decode_attention  # noqa: E402
from lcrun.kernels.topk import select_top_pages  # noqa: E402
from lcrun.kernels.triton_support import next_pow2  # noqa: E402
from lcrun.units import parse_tokens  # noqa: E402

# What each change was expected to save, written down before the H100 run that measured it (graph
# replay; "alone" = the part timed by itself, with a ~4-5 us floor per graph and L2 flushed; "step"
# = inside the captured plan + score + select + attend sequence). Two rounds: the first run on the
# H100 (2026-11-22, second JSON's "notes") measured round 1; round 2 is what this file now runs.
PREDICTIONS = {
    "round 1 / select: fused top-k + assembly, one program per KV head": (
        "alone: 32K 5, 128K 6, 512K 8, 1M 10 us (torch.topk + assembly: 27 / 41 / 94 / 64 us)"),
    "round 1 / score: CUDA-core kernel looping with prefetch": "1M 61 -> ~50 us; 128K 15 -> ~11 us",
    "round 1 / attend prototype: merge of the splits by the last program (atomic counter), V loaded with K": (
        "15 -> ~11 us alone"),
    "round 2 / select: atomic compaction instead of prefix sums (no row-sized shared memory), keys kept "
    "in the scratch row (no gather), row loaded while the plan is, page-table gather behind the ranking, "
    "all registers (maxnreg)": "alone: 32K ~7, 128K ~9, 512K ~10, 1M ~12 us",
    "round 2 / score: tensor cores (relu(Q) kmax^T + min(Q,0) kmin^T), pipelined async copies": (
        "1M 61 -> 47-50 us (~2.8 TB/s), 128K 15.5 -> 9-10 us, 32K 9 -> ~7 us"),
    "plan": "unchanged: one tiny kernel, ~5 us alone (the graph-timing floor), ~1-2 us in the step, once per "
            "step for all 32 layers in the runtime",
    "round 2 / totals (graph, incl. plan)": "32K ~25 us (2.6x), 128K ~30 us (6.4x), 512K ~50 us (14x), 1M ~72 us (19x)",
    "round 3 / folded plan (bounds computed in the score and top-k kernels, no plan launch)": (
        "flat total -1.5..2 us: 128K 37.8 -> ~36 us (5.3x), 1M 101.7 -> ~100 us"),
    "round 3 / hierarchical 32x32 (chunk abstracts of 32 pages, pages of the best 32 chunks)": (
        "chunk score reads 1/32 of the page abstracts: 4.2 MB at 1M -> ~5 us alone (latency floor), ~4.5 us at "
        "128K; pages kernel (sort of the chunk row + 32 pages per program) ~5 us; final sort of 1024 keys per head "
        "~5 us; hier select ~12-15 us alone; hier total (with attend ~15 us alone) ~25-28 us at every context: "
        "128K ~7x, 1M ~50x"),
    "round 4 / hier kernels without sorts (after round 3 measured 40.5 us at 128K and 57.2 us at 1M for 32x32: "
    "tl.sort of 1024 int64 keys ~15-20 us)": (
        "chunk choice by group leaders + rank by comparison (no sort of the chunk row), final top pages by "
        "threshold + compaction + rank (no sort of 1024 keys): hier select 30 -> ~15 us at 128K, 46 -> ~17 us at "
        "1M; hier total 32x32: 128K 40.5 -> ~28 us (~7x), 1M 57.2 -> ~30 us (~45x); 32x64 no longer much slower"),
    "round 5 / 8 warps and 128 leader groups (round 4 measured no gain: the 256x256 and 128x128 int64 "
    "comparison tiles in 4 warps are 128-512 values per thread: spilled)": (
        "64 compared pairs per thread: pages kernel and final top-k ~3-4 us each; hier select alone ~15-18 us; hier "
        "total 32x32 ~30 us at 128K (~6.4x), ~32 us at 1M (~43x); hot-page recall at 512K/1M ~0.9 (more "
        "leader collisions with 128 groups)"),
    "round 3 / recall": ("random keys: low (128K: 32 of 128 chunks, ~0.3-0.5 of flat's top pages; 1M: 32 of 1024 "
                         "chunks, ~0.05-0.1); structured (24 hot pages per head): hot-page recall 1.0 when top chunks "
                         ">= 24, attention mass within a few % of flat's"),
}
NOTES = {
    "round 1 measured (H100, graph replay, alone)": (
        "fused top-k v1 (prefix-sum compaction): 128K 13.6 us (4 warps 12.9) vs torch.topk 41.6; 1M: 16 and 32 "
        "warps did not launch (Triton 3.6 put the row's prefix sums through 256 KiB of shared memory), 8 warps "
        "59.8 us (spilling) vs torch.topk 64.1. Totals: 128K 65.5 -> 38.1 us. CUDA-core score kernel variants "
        "(looping, prefetch by hand, 8..64 pages, 4/8 warps): none beat the one-block-per-program kernel "
        "(60.5 us at 1M, 14.9-15.5 at 128K); Triton does not software-pipeline loads that feed no tl.dot. "
        "Attend prototype with the merge by the last program: 21.5 us vs 15.0 (split + merge kernels), "
        "16 or 8 splits: 16-19 us: not adopted (sparse_decode.py unchanged)."),
    "round 2 measured (H100, bench_attention-h100-2026-11-22-fused-topk.json)": (
        "fused top-k alone: 11.8 / 14.4 / 15.5 / 27.0 us at 32K / 128K / 512K / 1M (predicted 7 / 9 / 10 / 12; "
        "torch.topk + assembly 27 / 41 / 93 / 64); the 32K-page row still spills at 16 and 32 warps. Tensor-core "
        "score kernel: pipelined (async copies) but no faster: 60.3-61.8 us at 1M for every shape, like the "
        "CUDA-core kernel. Suspected cause, not yet tested: do_bench zeroes a 256 MiB buffer before each run, "
        "leaving L2 (50 MB) full of dirty lines that the kernel's reads must first write back (~16 us at 3 TB/s); "
        "a read-only flush would tell how much of the 17 us above the 43 us read floor is this artifact."),
    "round 3 measured (H100, first hierarchical version with tl.sort)": (
        "folded plan: flat total 27.9 / 36.5 / 59.6 / 99.4 us at 32K / 128K / 512K / 1M (was 30.3 / 37.3 / 60.9 / "
        "101.3 with the plan launch; predicted -1.5..2 us: met). Hierarchical 32x32: 40.1 / 40.5 / 43.4 / 57.2 us "
        "(1.6 / 4.8 / 16.3 / 24.3x); hier select alone 29-46 us vs ~12-15 predicted. Miss: tl.sort (bitonic, "
        "55 compare-swap steps for 1024 keys, each a cross-thread exchange) costs ~15-20 us per 1024 int64 keys: "
        "the final sort of 1024 candidates per head (~15 us at every context) and, at 1M, the sort of the "
        "1024-chunk row in each pages program (+16 us). Variants with 512 candidates (32x16, 16x32) were ~10 us "
        "faster. Chunk score: 7.4-8.9 us (latency-bound: 0.5-4 MB). Recall (32x32): random keys 1.00 / 0.33 / "
        "0.09 / 0.07 of flat's top pages (all pages alike: attention mass equal to flat's, 0.016 at 128K); "
        "structured keys (24 hot pages per head): hot-page recall 1.00 and attention mass equal to flat's "
        "(0.961 / 0.889 / 0.742 / 0.633) at every context; 16-chunk variants miss hot pages (0.67-0.93)."),
    "round 4 measured (sort-free hier kernels, 4 warps, 256 leader groups)": (
        "hier select alone 25.1 / 32.8 / 38.0 / 39.0 us (round 3: 29.2 / 30.0 / 32.7 / 45.9); hier total 32x32 "
        "41.9 / 44.8 / 48.8 / 50.4 us (1.5 / 4.3 / 14.5 / 27.6x). Miss (predicted ~15 us select): the "
        "rank-by-comparison tiles (GROUPS x GROUPS leaders, 128 x 128 candidates, int64) in 4 warps hold "
        "128-512 values per thread, spilled; hot-page recall at 512K/1M fell to 0.96 (two hot chunks in one leader "
        "group: only the better competes)."),
    'round 5 measured (8 warps, 128 leader groups; bench_attention-h100-2026-11-22-hier.json)': (
        "hier 32x32 total 31.7 / 34.4 / 35.2 / 37.0 us at 32K / 128K / 512K / 1M = 2.0 / 5.6 / 20.1 / 37.7x vs cuDNN (predicted ~30 us, 6.4x at 128K and ~32 us, 43x at 1M: 2-5 us slower); hier select alone 20.5 / 23.3 / 23.6 / 25.3 us (chunk score 7.3-8.9 of it, latency-bound at 18-470 GB/s for 0.5-4 MB); 32x16: 6.0x at 128K, 41.2x at 1M but hot-page recall 0.67-0.74. Flat with the folded plan: 27.8 / 36.1 / 59.5 / 99.6 us (2.3 / 5.3 / 11.9 / 14.0x), score kernel 2220 GB/s at 1M (74% of the 3001 GB/s copy). Structured keys: hot-page recall 32x32 1.00 / 1.00 / 0.93 / 0.92 (128 leader groups: two hot chunks in one group keep only the better one), attention mass 0.961 / 0.889 / 0.692 / 0.585 vs flat 0.961 / 0.889 / 0.742 / 0.633. Random keys: recall of flat's top pages 1.00 / 0.33 / 0.09 / 0.06, attention mass equal to flat's (all pages alike). In the hier step at 128K and 1M the attend (~15 us alone) and the selection's three latency-bound launches (~23-25 us alone) dominate; no byte stream is left to dominate."),
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="32k,128k,512k,1M", help="comma-separated context lengths")
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--page", type=int, default=32)
    ap.add_argument("--sinks", type=int, default=64)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--group-score", choices=["max", "sum"], default="max")
    ap.add_argument("--num-splits", type=int, default=None, help="override the sparse attend split heuristic")
    ap.add_argument("--score-block-pages", type=int, default=None, help="override pages per score program")
    ap.add_argument("--score-kernel", choices=["grid", "mma"], default=None, help="score.py's default if unset")
    ap.add_argument("--score-warps", type=int, default=None)
    ap.add_argument("--score-programs", type=int, default=None, help="mma kernel: programs per KV head")
    ap.add_argument("--score-stages", type=int, default=None, help="mma kernel: pipeline depth")
    ap.add_argument("--topk-warps", type=int, default=None, help="override the fused top-k's num_warps")
    ap.add_argument("--topk-groups", type=int, default=None, help="override the fused top-k's threshold groups")
    ap.add_argument("--topk-cap", type=int, default=None, help="override the fused top-k's survivor capacity")
    ap.add_argument("--chunk-pages", type=int, default=32, help="hierarchical selection: pages per chunk abstract")
    ap.add_argument("--top-chunks", type=int, default=32, help="hierarchical selection: chunks whose pages compete")
    ap.add_argument("--hier-variants", default="32x16,32x32,32x64,16x32,16x64",
                    help="CPxTOP hierarchical variants timed and scored for recall at each context")
    ap.add_argument("--hot-pages", type=int, default=24,
                    help="structured keys: pages per KV head whose keys lean towards the query")
    ap.add_argument("--hot-strength", type=float, default=16.0,
                    help="structured keys: hot keys = randn + strength * unit(mean query of the group)")
    ap.add_argument("--tune", action="store_true",
                    help="first time kernel variants at each context, then benchmark with the best")
    ap.add_argument("--git-commit", default=None, help="record this commit where the checkout has no git history")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    ap.add_argument("--rep", type=int, default=200, help="do_bench repetition time, ms")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    ap.add_argument("--out", default=None, help="JSON path (default perf/results/bench_attention-<gpu>-<date>.json)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, few reps (CPU interpreter without CUDA)")
    args = ap.parse_args()
    if args.smoke:
        args.contexts, args.hq, args.hkv, args.head_dim = "512,1000", 8, 2, 64
        args.budget, args.page, args.sinks, args.window = 256, 16, 16, 64
        args.chunk_pages, args.top_chunks, args.hier_variants, args.hot_pages = 4, 4, "4x2,4x4", 4
    return args


# -- timing ----------------------------------------------------------------------------------------

def time_ms(fn, args) -> dict:
    """Median (and 20/80 %) milliseconds of fn; wall-clock loop where there is no CUDA."""
    if torch.cuda.is_available():
        med, lo, hi = triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "p20_ms": lo, "p80_ms": hi}
    fn()
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1e3)
    runs.sort()
    return {"ms": runs[1], "p20_ms": runs[0], "p80_ms": runs[2]}


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


# -- inputs ----------------------------------------------------------------------------------------

class Layer:
    """One layer's paged K/V for ``context`` tokens (identity page table) and a decode query.
    hot > 0: structured keys: ``hot`` random candidate pages per KV head get keys along the mean
    query of their group (strength * unit vector added), so a few pages matter (retrieval-like)."""

    def __init__(self, context: int, args, seed: int = 0, hot: int = 0, chunk_pages=()):
        dev, dtype, P = device(), DTYPES[args.dtype], args.page
        torch.manual_seed(seed)
        self.context, self.P = context, P
        self.max_pages = -(-context // P)
        hkv, d = args.hkv, args.head_dim
        num_slots = hkv * self.max_pages
        self.q = torch.randn(args.hq, d, device=dev, dtype=dtype)
        self.k_pool = torch.randn(num_slots, P, d, device=dev, dtype=dtype)
        self.v_pool = torch.randn(num_slots, P, d, device=dev, dtype=dtype)
        self.hot_pages = None
        if hot:
            lo = -(-args.sinks // P)
            hi = max(lo + 1, (context - args.window) // P - 1)
            direction = self.q.float().view(hkv, -1, d).mean(1)
            direction = direction / direction.norm(dim=-1, keepdim=True)
            self.hot_pages = torch.stack([torch.randperm(hi - lo, device=dev)[:hot] + lo for _ in range(hkv)])
            slots = (torch.arange(hkv, device=dev)[:, None] * self.max_pages + self.hot_pages).flatten()
            boost = (args.hot_strength * direction).repeat_interleave(hot, 0)[:, None, :]
            self.k_pool[slots] = (self.k_pool[slots].float() + boost).to(dtype)
        self.table = torch.arange(num_slots, device=dev, dtype=torch.int32).reshape(hkv, self.max_pages)
        self.kmin = torch.empty(hkv, self.max_pages, d, device=dev, dtype=dtype)
        self.kmax = torch.empty_like(self.kmin)
        update_abstracts(self.k_pool, self.table, self.kmin, self.kmax,
                         torch.arange(context // P, device=dev, dtype=torch.int32))
        self.seq_len = torch.tensor([context], device=dev, dtype=torch.int32)
        self.num_full = torch.tensor([context // P], device=dev, dtype=torch.int32)
        self.last_page = torch.tensor([(context - 1) // P], device=dev, dtype=torch.int32)
        self.chunks = {}  # chunk_pages -> (cmin, cmax)
        all_pages = torch.arange(self.max_pages, device=dev, dtype=torch.int32)
        for cp in chunk_pages:
            cmin, cmax = chunk_abstracts_like(self.kmin, cp)
            update_chunk_abstracts(self.kmin, self.kmax, cmin, cmax, all_pages, self.num_full, cp)
            self.chunks[cp] = (cmin, cmax)

    def dense_kv(self):
        """(Hkv, context, D) views of the pools: with the identity table, head h's pages are adjacent."""
        hkv, d = self.kmin.shape[0], self.kmin.shape[2]
        k = self.k_pool.view(hkv, self.max_pages * self.P, d)[:, : self.context]
        v = self.v_pool.view(hkv, self.max_pages * self.P, d)[:, : self.context]
        return k, v


def plan(layer: Layer, args):
    """Once per decode step in the runtime (shared by all layers)."""
    return plan_selection(layer.seq_len, layer.max_pages, args.page, args.sinks, args.window, args.budget,
                          bounds_fn=selection_bounds)


def folded_plan(layer: Layer, args):
    """The plan with nothing launched: the kernels compute the bounds from seq_len."""
    return plan_selection(layer.seq_len, layer.max_pages, args.page, args.sinks, args.window, args.budget,
                          fold=True)


def hier_select(layer: Layer, args, step_plan, chunk_pages=None, top_chunks=None):
    cp = chunk_pages or args.chunk_pages
    cmin, cmax = layer.chunks[cp]
    return select_top_pages_hier(layer.q, layer.kmin, layer.kmax, cmin, cmax, layer.num_full, layer.table,
                                 step_plan, cp, top_chunks or args.top_chunks, args.group_score)


def hier_step(layer: Layer, args, out=None, chunk_pages=None, top_chunks=None):
    """Hierarchical layer: folded plan, chunk scores, pages of the best chunks, top-k, attend."""
    slots, lens = hier_select(layer, args, folded_plan(layer, args), chunk_pages, top_chunks)
    return attend(layer, args, slots, lens, out)


def flat_step_folded(layer: Layer, args, out=None):
    """Flat layer with the plan folded into the score and top-k kernels (no plan launch)."""
    step_plan = folded_plan(layer, args)
    scores = score(layer, args, step_plan)
    slots, lens = select(layer, scores, step_plan, args)
    return attend(layer, args, slots, lens, out)


def score(layer: Layer, args, step_plan, **variant):
    kw = dict(kernel=args.score_kernel, block_pages=args.score_block_pages, num_warps=args.score_warps,
              programs_per_head=args.score_programs, num_stages=args.score_stages)
    kw.update(variant)
    return score_pages(layer.q, layer.kmin, layer.kmax, layer.num_full, args.group_score,
                       candidates=step_plan if step_plan.bounds is None else step_plan.bounds, **kw)


def select(layer: Layer, scores, step_plan, args=None, **variant):
    """The runtime's selection: fused top-k + assembly, one launch (lcrun.kernels.topk)."""
    kw = {}
    if args is not None:
        warps = args.topk_warps
        if warps is None and getattr(args, "topk_warps_by_context", None):
            warps = args.topk_warps_by_context.get(layer.context)
        kw = dict(num_warps=warps, groups=args.topk_groups, cap=args.topk_cap)
    kw.update(variant)
    return select_top_pages(scores, layer.table, step_plan, **kw)


def select_old(layer: Layer, scores, step_plan):
    """The previous selection: torch.topk + the assembly kernel."""
    return select_with_plan(scores, layer.table, step_plan, assemble=assemble_selection, masked=True)


def attend(layer: Layer, args, slots, lens, out=None):
    return sparse_decode_attention(layer.q, layer.k_pool, layer.v_pool, slots, lens,
                                   num_splits=args.num_splits, out=out)


def sparse_step(layer: Layer, args, out: torch.Tensor | None = None, old: bool = False, with_plan: bool = True,
                step_plan=None):
    """What one layer costs in a decode step, plus the per-step plan, as the cache runs them.
    old: torch.topk selection; with_plan=False: the layer alone (the runtime plans once per step
    for all layers), given ``step_plan``."""
    if with_plan:
        step_plan = plan(layer, args)
    scores = score(layer, args, step_plan)
    slots, lens = select_old(layer, scores, step_plan) if old else select(layer, scores, step_plan, args)
    return attend(layer, args, slots, lens, out)


def same_selection(a, b) -> tuple[bool, bool]:
    """(identical, same set per head) of two (slots, lens) selections."""
    exact = torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    as_sets = (torch.equal(a[0].sort(dim=1).values, b[0].sort(dim=1).values)
               and torch.equal(a[1].sum(dim=1), b[1].sum(dim=1)))
    return exact, as_sets


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# -- correctness -----------------------------------------------------------------------------------

def check_correctness(args) -> None:
    """Budget >= context: the sparse path must equal dense attention; and at a small budget it must
    equal the torch reference attending to the same selection. Exits on a mismatch."""
    tol = 2e-2  # bf16/fp16 output rounding
    context = 1000 if args.smoke else 4000
    small = argparse.Namespace(**{**vars(args), "budget": max(args.budget, 2 * context)})
    layer = Layer(context, small, seed=1)
    k, v = layer.dense_kv()
    g = args.hq // args.hkv
    dense = torch.softmax((layer.q.float().view(args.hkv, g, -1) @ k.float().transpose(1, 2))
                          / math.sqrt(args.head_dim), dim=-1) @ v.float()
    err_dense = rel_err(sparse_step(layer, small), dense.reshape(args.hq, -1))

    step_plan = plan(layer, args)
    scores = score(layer, args, step_plan)
    ref_scores = reference.score_pages(layer.q, layer.kmin, layer.kmax, layer.num_full, args.group_score,
                                       candidates=step_plan.bounds)
    scored = torch.isfinite(ref_scores)
    if not torch.equal(scored, torch.isfinite(scores)):
        raise SystemExit("CORRECTNESS FAILURE: the score kernel scores other pages than the reference")
    err_scores = rel_err(scores[scored], ref_scores[scored])
    slots, lens = select(layer, scores, step_plan, args)
    ref_slots, ref_lens = select_with_plan(ref_scores, layer.table, step_plan)
    if not same_selection((slots, lens), (ref_slots, ref_lens))[1]:
        raise SystemExit("CORRECTNESS FAILURE: the fused selection differs from the torch selection")
    if not same_selection(select_old(layer, scores, step_plan), (ref_slots, ref_lens))[1]:
        raise SystemExit("CORRECTNESS FAILURE: the old (torch.topk) selection differs from the torch selection")
    out = attend(layer, args, slots, lens)
    ref = reference.sparse_decode_attention(layer.q, layer.k_pool, layer.v_pool, slots, lens)
    err_sparse = rel_err(out, ref)
    print(f"correctness: dense-equivalent {err_dense:.2e}, scores {err_scores:.2e}, sparse {err_sparse:.2e}")
    if not (err_dense < tol and err_scores < 1e-5 and err_sparse < tol):
        raise SystemExit(f"CORRECTNESS FAILURE (tolerance {tol}): not benchmarking wrong kernels")


# -- dense baselines -------------------------------------------------------------------------------

def dense_variants(layer: Layer, args) -> dict:
    """SDPA decode over the whole context, by backend and GQA formulation; each timed or its error."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    k, v = layer.dense_kv()
    k4, v4 = k[None], v[None]  # (1, Hkv, L, D)
    g = args.hq // args.hkv
    q_gqa = layer.q.view(1, args.hq, 1, -1)
    q_rows = layer.q.view(1, args.hkv, g, -1)  # the G query heads of a group as G query rows: no GQA needed
    forms = {"enable_gqa": lambda: F.scaled_dot_product_attention(q_gqa, k4, v4, enable_gqa=True),
             "group_rows": lambda: F.scaled_dot_product_attention(q_rows, k4, v4)}
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION}
    if not torch.cuda.is_available():
        backends = {"math": SDPBackend.MATH}
    reference_out = None
    results = {}
    for bname, backend in backends.items():
        for fname, fn in forms.items():
            name = f"{bname}/{fname}"
            try:
                with sdpa_kernel(backend), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "kernel not used because ..." for unsupported shapes
                    got = fn().reshape(args.hq, -1)
                    if reference_out is None:
                        reference_out = got
                    elif rel_err(got, reference_out) > 2e-2:
                        raise RuntimeError(f"disagrees with the first dense result ({rel_err(got, reference_out):.2e})")
                    timing = time_ms(fn, args)
                    replay = None if args.no_graph else graph_of(fn)
                    if replay is not None:
                        timing["graph_ms"] = time_ms(replay, args)["ms"]
                results[name] = timing
            except Exception as exc:  # noqa: BLE001 - a backend that cannot run this shape is reported
                results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    return results


# -- one context -----------------------------------------------------------------------------------

def hier_variants(args) -> list[tuple[int, int]]:
    out = []
    for v in args.hier_variants.split(","):
        if v.strip():
            cp, tc = v.strip().split("x")
            out.append((int(cp), int(tc)))
    if (args.chunk_pages, args.top_chunks) not in out:
        out.insert(0, (args.chunk_pages, args.top_chunks))
    return out


def page_mask(layer: Layer, slots, lens) -> torch.Tensor:
    """(Hkv, max_pages) bool: pages selected (identity table: slot = h * max_pages + page)."""
    hkv = slots.shape[0]
    pages = (slots.long() - torch.arange(hkv, device=slots.device)[:, None] * layer.max_pages).clamp(0)
    mask = torch.zeros(hkv, layer.max_pages, dtype=torch.bool, device=slots.device)
    mask.scatter_(1, pages, lens > 0)
    return mask


class DenseProbs:
    """Softmax of the decode query over every token (fp32), for attention mass and output error."""

    def __init__(self, layer: Layer, args):
        k, v = layer.dense_kv()
        g = args.hq // args.hkv
        qg = layer.q.float().view(args.hkv, g, -1)
        self.probs = torch.softmax((qg @ k.float().transpose(1, 2)) / math.sqrt(args.head_dim), dim=-1)
        self.out = (self.probs @ v.float()).reshape(args.hq, -1)

    def mass(self, layer: Layer, mask: torch.Tensor) -> float:
        tokens = mask.repeat_interleave(layer.P, dim=1)[:, : layer.context]
        return (self.probs * tokens[:, None, :]).sum(-1).mean().item()


def quality(layer: Layer, args, flat_sel, variants, dense: DenseProbs) -> dict:
    """Per hierarchical variant: recall of the flat top pages (fraction of flat's top pages, sinks and
    window excluded, also picked), hot-page recall, attention mass captured, output error vs dense."""
    bounds = plan(layer, args).bounds
    cand = torch.zeros(layer.max_pages, dtype=torch.bool, device=bounds.device)
    cand[int(bounds[1]):int(bounds[2])] = True
    flat_mask = page_mask(layer, *flat_sel)
    flat_top = flat_mask & cand

    def describe(sel):
        mask = page_mask(layer, *sel)
        d = {"recall_vs_flat": ((mask & flat_top).sum() / flat_top.sum().clamp(min=1)).item(),
             "attention_mass": dense.mass(layer, mask),
             "out_rel_err_vs_dense": rel_err(attend(layer, args, *sel), dense.out)}
        if layer.hot_pages is not None:
            d["hot_recall"] = mask.gather(1, layer.hot_pages).float().mean().item()
        return d

    res = {"flat": describe(flat_sel)}
    for cp, tc in variants:
        res[f"hier/{cp}x{tc}"] = describe(hier_select(layer, args, folded_plan(layer, args), cp, tc))
    return res


def bench_context(context: int, args) -> dict:
    variants = hier_variants(args)
    layer = Layer(context, args, chunk_pages=sorted({cp for cp, _ in variants}))
    hkv, d, P = args.hkv, args.head_dim, args.page
    esize = layer.k_pool.element_size()
    step_plan = plan(layer, args)
    fplan = folded_plan(layer, args)
    scores = score(layer, args, step_plan)
    slots, lens = select(layer, scores, step_plan, args)
    out = torch.empty_like(layer.q)

    # The fused selection against torch.topk + assembly on the same scores (exact unless ties),
    # and the sparse output at scale against the torch reference on the same selection.
    exact, as_sets = same_selection((slots, lens), select_old(layer, scores, step_plan))
    if not as_sets:
        raise SystemExit(f"CORRECTNESS FAILURE at context {context}: fused selection != torch.topk selection")
    folded_sel = select(layer, score(layer, args, fplan), fplan, args)
    if not same_selection((slots, lens), folded_sel)[0]:
        raise SystemExit(f"CORRECTNESS FAILURE at context {context}: the folded plan selects other pages")
    ref = reference.sparse_decode_attention(layer.q, layer.k_pool, layer.v_pool, slots, lens)
    err = rel_err(attend(layer, args, slots, lens), ref)
    if err > 2e-2:
        raise SystemExit(f"CORRECTNESS FAILURE at context {context}: sparse attend vs reference {err:.2e}")
    # Hierarchical selection against its torch reference (pages differing only by near-ties allowed).
    cp0, tc0 = args.chunk_pages, args.top_chunks
    hier_sel = hier_select(layer, args, fplan)
    hier_ref = reference.select_top_pages_hier(layer.q, layer.kmin, layer.kmax, *layer.chunks[cp0], layer.num_full,
                                               layer.table, step_plan, cp0, tc0, args.group_score)
    hier_diff = (page_mask(layer, *hier_sel) ^ page_mask(layer, *hier_ref)).sum(1).max().item()
    if hier_diff > 2 or not torch.equal(hier_sel[1].sum(1), hier_ref[1].sum(1)):
        raise SystemExit(f"CORRECTNESS FAILURE at context {context}: hierarchical selection != reference "
                         f"({hier_diff} pages differ)")

    attended_tokens = int(lens.sum())
    scored_pages = int(torch.isfinite(scores[0]).sum())  # candidates: full pages, not sink or window
    score_bytes = 2 * hkv * scored_pages * d * esize + layer.q.numel() * esize + hkv * layer.max_pages * 4
    attend_bytes = 2 * attended_tokens * d * esize + layer.q.numel() * esize * 2 + slots.numel() * 8
    dense_bytes = 2 * hkv * context * d * esize
    n_chunks = layer.chunks[cp0][0].shape[1]
    chunk_bytes = 2 * hkv * n_chunks * d * esize
    hier_pages_bytes = 2 * hkv * min(tc0 * cp0, layer.max_pages) * d * esize
    splits, pages_per_split = decode_splits(hkv, slots.shape[1], P, max(64, P), layer.q.device, args.num_splits)

    parts = {
        "plan (per step)": (lambda: plan(layer, args), None),
        "score": (lambda: score(layer, args, step_plan), score_bytes),
        "select": (lambda: select(layer, scores, step_plan, args), None),
        "select (torch.topk, old)": (lambda: select_old(layer, scores, step_plan), None),
        "attend": (lambda: attend(layer, args, slots, lens, out), attend_bytes),
        "abstract upkeep (1 page)": (lambda: update_abstracts(layer.k_pool, layer.table, layer.kmin, layer.kmax,
                                                              layer.last_page, layer.seq_len), None),
        "chunk upkeep (1 chunk)": (lambda: update_chunk_abstracts(layer.kmin, layer.kmax, *layer.chunks[cp0],
                                                                  layer.last_page, layer.num_full, cp0), None),
        "sparse total": (lambda: sparse_step(layer, args, out), None),
        "sparse total (torch.topk, old)": (lambda: sparse_step(layer, args, out, old=True), None),
        "layer without plan": (lambda: sparse_step(layer, args, out, with_plan=False, step_plan=step_plan), None),
        "flat total (folded plan)": (lambda: flat_step_folded(layer, args, out), None),
        "hier: chunk score": (lambda: score_pages(layer.q, *layer.chunks[cp0], layer.num_full, args.group_score,
                                                  candidates=fplan, row_pages=cp0), chunk_bytes),
        "hier: select (chunk score + pages + top-k)": (lambda: hier_select(layer, args, fplan),
                                                       chunk_bytes + hier_pages_bytes),
        "hier total (folded plan)": (lambda: hier_step(layer, args, out), None),
    }
    for cp, tc in variants:
        if (cp, tc) != (cp0, tc0):
            parts[f"hier total {cp}x{tc}"] = (lambda cp=cp, tc=tc: hier_step(layer, args, out, cp, tc), None)
    timings = {}
    for name, (fn, nbytes) in parts.items():
        timing = time_ms(fn, args)
        if nbytes is not None:
            timing = with_bandwidth(timing, nbytes)
        replay = None if args.no_graph else graph_of(fn)
        if replay is not None:
            timing["graph_ms"] = time_ms(replay, args)["ms"]
            if nbytes is not None:
                timing["graph_GBps"] = nbytes / (timing["graph_ms"] * 1e-3) / 1e9
        timings[name] = timing

    # Selection quality of each hierarchical variant against flat selection: random keys, then
    # structured keys (a few pages per head aligned with the query).
    qual = {"random": quality(layer, args, (slots, lens), variants, DenseProbs(layer, args))}
    dense = dense_variants(layer, args)
    layer = None  # frees the pools before the next context (the timing lambdas share this cell)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    hot = Layer(context, args, seed=1, hot=args.hot_pages, chunk_pages=sorted({cp for cp, _ in variants}))
    hot_plan = plan(hot, args)
    hot_sel = select(hot, score(hot, args, hot_plan), hot_plan, args)
    qual["structured"] = quality(hot, args, hot_sel, variants, DenseProbs(hot, args))
    del hot
    ok = {k: v for k, v in dense.items() if "ms" in v}
    best_name = min(ok, key=lambda k: ok[k].get("graph_ms", ok[k]["ms"])) if ok else None
    result = {
        "context": context, "attended_tokens_all_heads": attended_tokens, "kmax": slots.shape[1],
        "num_splits": splits, "pages_per_split": pages_per_split, "sparse_vs_reference_rel_err": err,
        "fused_selection_identical_to_torch_topk": exact, "fused_selection_same_sets": as_sets,
        "sparse": timings, "dense": dense, "dense_best": best_name, "selection_quality": qual,
        "hier_vs_reference_max_pages_differing": hier_diff, "chunks_per_head": n_chunks,
    }
    if best_name is not None:
        best = ok[best_name]
        best_ms = best.get("graph_ms", best["ms"])
        result["dense_best_GBps"] = dense_bytes / (best["ms"] * 1e-3) / 1e9
        result["dense_bytes"] = dense_bytes
        result["speedup_eager"] = best["ms"] / timings["sparse total"]["ms"]
        result["speedup_eager_old"] = best["ms"] / timings["sparse total (torch.topk, old)"]["ms"]
        if "graph_ms" in timings["sparse total"]:
            result["speedup_graph"] = best_ms / timings["sparse total"]["graph_ms"]
            result["speedup_graph_old"] = best_ms / timings["sparse total (torch.topk, old)"]["graph_ms"]
            result["speedup_graph_without_plan"] = best_ms / timings["layer without plan"]["graph_ms"]
            result["speedup_graph_flat_folded"] = best_ms / timings["flat total (folded plan)"]["graph_ms"]
            result["speedup_graph_hier"] = best_ms / timings["hier total (folded plan)"]["graph_ms"]
            result["speedup_graph_hier_variants"] = {
                f"{cp}x{tc}": best_ms / timings["hier total (folded plan)" if (cp, tc) == (cp0, tc0)
                                               else f"hier total {cp}x{tc}"]["graph_ms"] for cp, tc in variants}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


# -- tuning: kernel variants -----------------------------------------------------------------------

SCORE_VARIANTS = [  # kernel, block_pages, num_warps, programs per KV head, num_stages
    ("grid", 32, 8, None, None), ("grid", 16, 8, None, None),
    ("mma", 64, 4, 17, 3), ("mma", 64, 4, 33, 3), ("mma", 64, 4, 66, 3), ("mma", 32, 4, 33, 4),
    ("mma", 32, 4, 66, 3), ("mma", 64, 8, 33, 3), ("mma", 128, 8, 17, 3), ("mma", 32, 4, 132, 3),
]


def score_variant_kw(v) -> dict:
    return dict(zip(("kernel", "block_pages", "num_warps", "programs_per_head", "num_stages"), v))


def score_variant_name(v) -> str:
    return f"{v[0]}/block{v[1]}/w{v[2]}" + (f"/programs{v[3]}/stages{v[4]}" if v[0] == "mma" else "")


def topk_warps_candidates(max_pages: int) -> list[int]:
    block = next_pow2(max_pages)
    return [4, 8] if block <= 2048 else [4, 8, 16] if block <= 8192 else [8, 16, 32] if block <= 16384 else [16, 32]


def _graph_us(fn, args) -> float | str:
    """Graph-replay median in us (eager wall clock without CUDA), or the error."""
    try:
        fn()
        replay = None if args.no_graph else graph_of(fn)
        return round(time_ms(replay or fn, args)["ms"] * 1e3, 2)
    except Exception as exc:  # noqa: BLE001 - a variant that fails to compile or run is reported
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def tune_context(context: int, args) -> dict:
    """Each score variant and each top-k num_warps (and the top-k fallback alone), checked against
    the reference path and timed alone (graph replay)."""
    layer = Layer(context, args)
    step_plan = plan(layer, args)
    scores = score(layer, args, step_plan, kernel="grid", block_pages=None, num_warps=8)
    ref_sel = select_old(layer, scores, step_plan)
    res = {"context": context, "score": {}, "select": {}}
    for v in SCORE_VARIANTS:
        kw = score_variant_kw(v)
        try:
            got = score(layer, args, step_plan, **kw)
            ok = bool(torch.equal(got.isinf(), scores.isinf()) and rel_err(got[scores.isfinite()],
                                                                            scores[scores.isfinite()]) < 1e-5)
        except Exception as exc:  # noqa: BLE001
            ok = f"{type(exc).__name__}: {str(exc)[:200]}"
        us = _graph_us(lambda kw=kw: score(layer, args, step_plan, **kw), args) if ok is True else None
        res["score"][score_variant_name(v)] = {"us": us, "ok": ok}
    res["select"]["torch.topk + assembly (old)"] = {"us": _graph_us(lambda: select_old(layer, scores, step_plan), args)}
    variants = [(w, "filter") for w in topk_warps_candidates(layer.max_pages)] + [(None, "bisect")]
    for warps, method in variants:
        kw = dict(num_warps=warps, method=method)
        try:
            exact, as_sets = same_selection(select(layer, scores, step_plan, **kw), ref_sel)
            ok = as_sets and (exact or method == "bisect")
        except Exception as exc:  # noqa: BLE001
            ok = f"{type(exc).__name__}: {str(exc)[:200]}"
        us = _graph_us(lambda kw=kw: select(layer, scores, step_plan, **kw), args) if ok is True else None
        res["select"][f"fused/w{warps or 'default'}/{method}"] = {"us": us, "ok": ok, "num_warps": warps,
                                                                  "method": method}
    layer = None  # frees the pools before the next context (the timing lambdas share this cell)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def tune(args, contexts) -> dict:
    """Times the variants at every context, then picks one score variant for all (the smallest
    sum over contexts of time / best time there) and the top-k num_warps of each row size."""
    fast = argparse.Namespace(**{**vars(args), "warmup": 5, "rep": 20})
    per_context = []
    for context in contexts:
        t0 = time.perf_counter()
        r = tune_context(context, fast)
        per_context.append(r)
        print(f"tuning {context} ({time.perf_counter() - t0:.0f} s), graph-replay us:")
        for part in ("score", "select"):
            for name, v in r[part].items():
                print(f"  {part:6} {name:44} {v['us']!s:>9}  {'' if v.get('ok', True) is True else v.get('ok')}")
    ratios = {}
    for v in SCORE_VARIANTS:
        name = score_variant_name(v)
        times = [r["score"][name]["us"] for r in per_context]
        if all(isinstance(t, float) for t in times):
            bests = [min(x["us"] for x in r["score"].values() if isinstance(x["us"], float)) for r in per_context]
            ratios[name] = sum(t / b for t, b in zip(times, bests))
    best_score = min(ratios, key=ratios.get) if ratios else score_variant_name(SCORE_VARIANTS[0])
    score_kw = score_variant_kw(next(v for v in SCORE_VARIANTS if score_variant_name(v) == best_score))
    topk_warps = {}
    for r in per_context:
        timed = {k: v for k, v in r["select"].items() if v.get("method") == "filter" and isinstance(v["us"], float)}
        if timed:
            best = min(timed, key=lambda k: timed[k]["us"])
            topk_warps[r["context"]] = timed[best]["num_warps"]
    choice = {"score": score_kw, "score_name": best_score, "score_ratio_sums": ratios, "topk_warps": topk_warps}
    print(f"tuned: score {best_score}, top-k warps by context {topk_warps}", flush=True)
    return {"choice": choice, "per_context": per_context}


# -- report ----------------------------------------------------------------------------------------

def environment(commit_override: str | None = None) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = commit_override or "unknown"
    try:  # files changed since that commit (a benchmark of uncommitted work says so)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True,
                               text=True, check=True, cwd=Path(__file__).resolve().parent).stdout.split("\n")
        dirty = sorted(line[3:] for line in dirty if line.strip())
    except Exception:  # noqa: BLE001
        dirty = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu-interpreter"
    return {"gpu": gpu, "git_commit": commit or "unknown", "git_modified_files": dirty, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def print_table(results: list[dict], copy_bw: dict) -> None:
    """Kernel times from CUDA-graph replay where there is one (what the captured runtime sees)."""
    print(f"\ndevice-to-device copy: {copy_bw['GBps']:.0f} GB/s (read + write); times in us, "
          f"graph replay where available (eager in brackets); old = torch.topk selection")
    head = (f"{'context':>8} | {'plan':>5} | {'score':>6} {'GB/s':>5} | {'select':>6} {'(old)':>6} | "
            f"{'attend':>6} {'GB/s':>5} | {'sparse':>6} {'(eager)':>8} {'old':>6} {'-plan':>6} | "
            f"{'dense':>7} {'GB/s':>5} | {'speedup':>7} {'old':>5} {'-plan':>5}")
    print(head)
    print("-" * len(head))
    for r in results:
        s = r["sparse"]
        t = lambda part: s[part].get("graph_ms", s[part]["ms"]) * 1e3  # noqa: E731
        bw = lambda part: s[part].get("graph_GBps", s[part]["GBps"])  # noqa: E731
        dense = r["dense"].get(r["dense_best"], {}) if r["dense_best"] else {}
        dense_us = dense.get("graph_ms", dense.get("ms", float("nan"))) * 1e3
        print(f"{r['context']:>8} | {t('plan (per step)'):5.1f} | {t('score'):6.1f} {bw('score'):5.0f} | "
              f"{t('select'):6.1f} {t('select (torch.topk, old)'):6.1f} | {t('attend'):6.1f} {bw('attend'):5.0f} | "
              f"{t('sparse total'):6.1f} ({s['sparse total']['ms'] * 1e3:6.1f}) "
              f"{t('sparse total (torch.topk, old)'):6.1f} {t('layer without plan'):6.1f} | "
              f"{dense_us:7.1f} {r.get('dense_best_GBps', 0):5.0f} | "
              f"{r.get('speedup_graph', r.get('speedup_eager', 0)):7.1f} "
              f"{r.get('speedup_graph_old', r.get('speedup_eager_old', 0)):5.1f} "
              f"{r.get('speedup_graph_without_plan', 0):5.1f}")
    best = {r["context"]: r["dense_best"] for r in results}
    print(f"dense baseline = fastest SDPA variant per context: {best}")
    print("\nfolded plan (no plan launch) and hierarchical selection; us graph replay; speedup vs dense;"
          " quality: recall of flat's top pages / attention mass (random keys | structured keys, hot-page recall)")
    head = (f"{'context':>8} | {'flat':>6} {'x':>5} | {'chunk':>5} {'GB/s':>5} {'hsel':>5} {'hier':>6} {'x':>5} | "
            f"variant: us x recall(rand) mass(rand) | recall(str) hot mass(str)")
    print(head)
    print("-" * len(head))
    for r in results:
        s = r["sparse"]
        t = lambda part: s[part].get("graph_ms", s[part]["ms"]) * 1e3  # noqa: E731
        q = r["selection_quality"]
        print(f"{r['context']:>8} | {t('flat total (folded plan)'):6.1f} {r.get('speedup_graph_flat_folded', 0):5.1f} | "
              f"{t('hier: chunk score'):5.1f} {s['hier: chunk score'].get('graph_GBps', 0):5.0f} "
              f"{t('hier: select (chunk score + pages + top-k)'):5.1f} {t('hier total (folded plan)'):6.1f} "
              f"{r.get('speedup_graph_hier', 0):5.1f} | flat mass {q['random']['flat']['attention_mass']:.3f} | "
              f"{q['structured']['flat']['attention_mass']:.3f} hot {q['structured']['flat'].get('hot_recall', 0):.2f}")
        for name, vr in q["random"].items():
            if name == "flat":
                continue
            key = name.split("/")[1]
            vs = q["structured"][name]
            print(f"{'':>8} | {'':>12} | {'':>31} | {key:>7}: {r.get('speedup_graph_hier_variants', {}).get(key, 0):5.1f}x "
                  f"{vr['recall_vs_flat']:.2f} {vr['attention_mass']:.3f} | {vs['recall_vs_flat']:.2f} "
                  f"{vs.get('hot_recall', 0):.2f} {vs['attention_mass']:.3f}")


def main() -> None:
    args = parse_args()
    contexts = [parse_tokens(c.strip()) for c in args.contexts.split(",") if c.strip()]
    assert args.hq % args.hkv == 0
    env = environment(args.git_commit)
    print(f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | commit {env['git_commit'][:12]}")
    tuning = None
    if args.tune:
        tuning = tune(args, contexts)
        choice = tuning["choice"]
        args.score_kernel = choice["score"]["kernel"]
        args.score_block_pages = choice["score"]["block_pages"]
        args.score_warps = choice["score"]["num_warps"]
        args.score_programs = choice["score"]["programs_per_head"]
        args.score_stages = choice["score"]["num_stages"]
        args.topk_warps_by_context = choice["topk_warps"]
    check_correctness(args)
    copy_bw = copy_bandwidth(args)
    results = []
    for context in contexts:
        print(f"context {context} ...", flush=True)
        results.append(bench_context(context, args))
    print_table(results, copy_bw)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    report = {**env, "settings": settings, "predictions": PREDICTIONS, "notes": NOTES, "copy_bandwidth": copy_bw,
              "tuning": tuning, "results": results}
    out = Path(args.out) if args.out else (
        Path(__file__).resolve().parent / "results" /
        f"bench_attention-{re.sub(r'[^a-z0-9]+', '-', env['gpu'].lower()).strip('-')}-{datetime.date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
