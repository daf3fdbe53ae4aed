"""Per-layer time inside a decode step: L layers, each with its own K/V pools and abstracts, run back
to back in ONE CUDA graph, time / L; the same for dense attention over the same pools.

Why beside the single-layer numbers: a single-layer replay pays a graph launch per layer, and
do_bench's cache flush (a 256 MiB memset) leaves the L2 full of dirty lines that the first reads must
write back, which costs a kernel reading 8-16 MB several microseconds. In the runtime the layer's
kernels follow one another inside the step's graph, after matmuls that leave the L2 holding clean
weight lines. Distinct layers keep every layer's reads cold, as in a decode step (the L2 cannot
carry one layer's abstracts or pages to the next).

Also timed: the same graphs launched without programmatic dependent launch (lcrun.kernels.
triton_support.pdl_override(False)), so the PDL gain is measured side by side; and the first stages
of each step alone (score; score + select; chunk score; chunk score + pages + select), so the cost
of each kernel inside the graph is a difference of two stacks.
"""
from __future__ import annotations

import torch

from lcrun.kernels.triton_support import pdl_override
from lcrun.kernels.score import score_pages
from perf.attention.layer import (Layer, attend, dense_call, flat_step_folded, folded_plan, hier_select, hier_step,
                                  score, select)
from perf.attention.timing import graph_of, time_ms


def stack_depth(context: int, args) -> int:
    """Layers in the stack: as many as ``args.stack_gib`` of pools and abstracts hold, 2..32."""
    d, esize = args.head_dim, 2
    pages = -(-context // args.page)
    per_layer = args.hkv * pages * (2 * args.page * d + 2 * d) * esize
    return max(2, min(32, int(args.stack_gib * 2**30 // per_layer)))


def _per_layer_us(fns, args, pdl: bool | None = None) -> float | None:
    """Microseconds per layer of ``fns`` captured in one graph (None if capture fails)."""
    def step():
        for fn in fns:
            fn()
    if not torch.cuda.is_available():  # smoke run in the interpreter: eager, no graph
        replay = step
    elif pdl is None:
        replay = graph_of(step)
    else:
        with pdl_override(pdl):
            replay = graph_of(step)
    if replay is None:
        return None
    return time_ms(replay, args)["ms"] * 1e3 / len(fns)


def bench_stack(context: int, args, dense_best: str | None, hier: list[tuple[int, int]]) -> dict:
    """Per-layer us of flat and hierarchical sparse layers (with and without PDL) and of the dense
    baseline, each in a graph of ``stack_depth`` distinct layers; speedups against that dense."""
    n = 2 if args.smoke else stack_depth(context, args)
    chunk_pages = sorted({cp for cp, _ in hier})
    layers = [Layer(context, args, seed=100 + i, chunk_pages=chunk_pages) for i in range(n)]
    outs = [torch.empty_like(layer.q) for layer in layers]
    us = {}
    for pdl in (True, False) if torch.cuda.is_available() else (None,):
        tag = " (no PDL)" if pdl is False else ""
        us["flat" + tag] = _per_layer_us(
            [lambda i=i: flat_step_folded(layers[i], args, outs[i]) for i in range(n)], args, pdl)
        for cp, tc in hier:
            us[f"hier {cp}x{tc}{tag}"] = _per_layer_us(
                [lambda i=i, cp=cp, tc=tc: hier_step(layers[i], args, outs[i], cp, tc) for i in range(n)], args, pdl)
    stages = {
        "flat: score": lambda i: score(layers[i], args, folded_plan(layers[i], args)),
        "flat: score + select": lambda i: select(layers[i], score(layers[i], args, folded_plan(layers[i], args)),
                                                 folded_plan(layers[i], args), args),
    }
    selections = [select(layer, score(layer, args, folded_plan(layer, args)), folded_plan(layer, args), args)
                  for layer in layers]
    stages["attend (split + merge)"] = lambda i: attend(layers[i], args, *selections[i], outs[i])
    for cp, tc in hier[:1]:
        stages[f"hier {cp}x{tc}: chunk score"] = lambda i, cp=cp: score_pages(
            layers[i].q, *layers[i].chunks[cp], layers[i].num_full, args.group_score,
            candidates=folded_plan(layers[i], args), row_pages=cp)
        stages[f"hier {cp}x{tc}: select"] = lambda i, cp=cp, tc=tc: hier_select(
            layers[i], args, folded_plan(layers[i], args), cp, tc)
    stage_us = {name: _per_layer_us([lambda i=i, fn=fn: fn(i) for i in range(n)], args)
                for name, fn in stages.items()}
    result = {"layers": n, "per_layer_us": us, "stages_us": stage_us}
    if dense_best is not None:
        dense_us = _per_layer_us([dense_call(layer, args, dense_best) for layer in layers], args)
        us[f"dense {dense_best}"] = dense_us
        if dense_us:
            result["speedup"] = {name: dense_us / t for name, t in us.items() if t and not name.startswith("dense")}
    layers = outs = None  # the pools go before the next context
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def print_stack(results: list[dict]) -> None:
    rows = [(r["context"], r["stack"]) for r in results if r.get("stack")]
    if not rows:
        return
    print("\nper layer inside one graph of L distinct layers (us; speedup vs dense in the same stack)")
    for context, st in rows:
        cells = " | ".join(f"{name} {t:.1f}" + (f" ({st.get('speedup', {}).get(name, 0):.1f}x)"
                                                  if not name.startswith("dense") else "")
                           for name, t in st["per_layer_us"].items() if t is not None)
        print(f"{context:>8} L={st['layers']:<2} | {cells}")
        stages = " | ".join(f"{name} {t:.1f}" for name, t in st.get("stages_us", {}).items() if t is not None)
        print(f"{'':>8} stages | {stages}")
