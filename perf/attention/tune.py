"""--tune of `python -m perf.attention`: each score-kernel variant and top-k launch shape, checked
against the reference path and timed alone (graph replay); then the best are picked."""
from __future__ import annotations

import argparse
import time

import torch

from lcrun.kernels.triton_support import next_pow2
from perf.attention.layer import Layer, plan, rel_err, same_selection, score, select, select_old
from perf.attention.timing import graph_of, time_ms


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
