"""Decode attention for ONE layer: top-k page path (score + select + sparse attend) vs dense
flash decoding over the whole context, at Llama-3.1-8B shapes.

    python -m perf.attention                      # H100: 32K, 128K, 512K, 1M
    python -m perf.attention --contexts 32k,128k --budget 4096 --page 64
    python -m perf.attention --smoke              # tiny shapes; CPU interpreter without CUDA

    python -m perf.attention --tune               # time kernel variants first, then benchmark the best

The sparse path is timed as the runtime runs it (fused top-k + assembly, lcrun.kernels.topk) and,
beside it, with the previous torch.topk + assembly selection ("old").

Times are medians of triton.testing.do_bench (L2 flushed before each run), eager and replayed from a
CUDA graph (the runtime captures the decode step, so graph times are what it will see). Achieved
bandwidth = bytes the kernel must read / time; the device-to-device copy bandwidth of the same run
(bytes read + written) is the practical ceiling. Correctness is checked first; a mismatch aborts.

Per-layer times inside a decode step's graph (L distinct layers back to back, with and without
programmatic dependent launch, and the first stages alone) come from perf.attention.stack.

Beside this module: the layer and the operations timed (layer), timing helpers (timing), selection
quality (quality), --tune (tune), tables and the run's environment (report). What each round of
kernel work predicted and gave is condensed in docs/history.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
from pathlib import Path

import torch

from lcrun.kernels import reference, select_with_plan
from lcrun.kernels.abstracts import update_abstracts
from lcrun.kernels.chunk_abstracts import update_chunk_abstracts
from lcrun.kernels.score import score_pages
from lcrun.kernels.sparse_decode import decode_splits
from lcrun.units import parse_tokens
from perf.attention.layer import (DTYPES, Layer, attend, dense_call, dense_names, flat_step_folded,
                                  folded_plan, hier_select, hier_step, page_mask, plan, rel_err, same_selection,
                                  score, select, select_old, sparse_step)
from perf.attention.quality import DenseProbs, quality
from perf.attention.report import environment, print_table
from perf.attention.stack import bench_stack, print_stack
from perf.attention.timing import copy_bandwidth, graph_of, time_ms, with_bandwidth
from perf.attention.tune import tune


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
    ap.add_argument("--stack-gib", type=float, default=40.0,
                    help="per-layer times in a graph of distinct layers: GiB of pools for the stack (0: skip)")
    ap.add_argument("--stack-hier", default="32x16,32x32",
                    help="CPxTOP hierarchical variants timed in the stack")
    ap.add_argument("--out", default=None, help="JSON path (default perf/results/attention-<gpu>-<date>.json)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, few reps (CPU interpreter without CUDA)")
    args = ap.parse_args()
    if args.smoke:
        args.contexts, args.hq, args.hkv, args.head_dim = "512,1000", 8, 2, 64
        args.budget, args.page, args.sinks, args.window = 256, 16, 16, 64
        args.chunk_pages, args.top_chunks, args.hier_variants, args.hot_pages = 4, 4, "4x2,4x4", 4
        args.stack_hier = "4x2"
    return args


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
    reference_out = None
    results = {}
    for name in dense_names():
        try:
            fn = dense_call(layer, args, name)
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
    if args.stack_gib > 0:
        stack_hier = [tuple(int(x) for x in v.split("x")) for v in args.stack_hier.split(",") if v.strip()]
        result["stack"] = bench_stack(context, args, best_name, stack_hier)
    return result


def main() -> None:
    args = parse_args()
    contexts = [parse_tokens(c.strip()) for c in args.contexts.split(",") if c.strip()]
    assert args.hq % args.hkv == 0
    env = environment(args.git_commit)
    command = " ".join(["python -m perf.attention", *sys.argv[1:]])
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
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    out = Path(args.out) if args.out else (
        Path(__file__).resolve().parents[1] / "results" /
        f"attention-{re.sub(r'[^a-z0-9]+', '-', env['gpu'].lower()).strip('-')}-{datetime.date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for context in contexts:
        print(f"context {context} ...", flush=True)
        results.append(bench_context(context, args))
        # Written after every context, so a run stopped by a time limit keeps what it measured.
        report = {**env, "command": command, "settings": settings, "copy_bandwidth": copy_bw,
                  "tuning": tuning, "results": results}
        out.write_text(json.dumps(report, indent=2))
    print_table(results, copy_bw)
    print_stack(results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
