"""Where the fused top-k's time goes inside a decode step: stage timestamps (%globaltimer) from
every program of lcrun.kernels.topk, in a CUDA graph of L distinct layers (score -> top-k ->
attend, as perf.attention.stack runs them), at Llama-3.1-8B attention shapes.

Stages (per program = one KV head): 0 start, 1 after the PDL wait (the score kernel is done),
2 row loaded, 3 threshold, 4 kept pages counted, 5 compaction atomics returned, 6 scratch read
back, 7 ranked, 8 page table read. Reported: median over layers and replays of the slowest
program's time from stage 1 to each stage, the wait (0 -> 1), and from the top-k's last stage
to the next layer's top-k going (attend + next score).

    python -m perf.diag.topk_timeline --contexts 128k --out perf/results/diag-topk-timeline.json

(diag-h200-topk-timeline-variants.json compared kernel variants through switches since removed:
"atomic" = the compaction by a global atomic counter with a 128 x 128 ranking, the kernel before
round 8; "scan" = prefix-sum compaction; "+half" = the half-size ranking; the kept kernel is scan+half.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch


from lcrun.kernels.topk import select_top_pages
from lcrun.profiling.meta import run_metadata
from lcrun.units import parse_tokens
from perf.attention.layer import Layer, attend, folded_plan, score
from perf.attention.timing import graph_of, time_ms
from perf.attention.bench import parse_args

STAGES = ["start", "PDL wait done", "row loaded", "threshold", "kept counted", "compacted", "scratch read",
          "ranked", "page table read"]


def timeline_for(context: int, args, layers_n: int, replays: int, num_warps: int | None = None) -> dict:
    layers = [Layer(context, args, seed=200 + i) for i in range(layers_n)]
    outs = [torch.empty_like(layer.q) for layer in layers]
    stamps = [torch.zeros((args.hkv, 16), device="cuda", dtype=torch.int64) for _ in layers]

    def step(timed: bool = True, attend_too: bool = True):
        for layer, out, tl_buf in zip(layers, outs, stamps):
            plan = folded_plan(layer, args)
            scores = score(layer, args, plan)
            slots, lens = select_top_pages(scores, layer.table, plan, timeline=tl_buf if timed else None,
                                           num_warps=num_warps)
            if attend_too:
                attend(layer, args, slots, lens, out)

    def stack_us(**kw) -> float:
        return time_ms(graph_of(lambda: step(**kw)), args)["ms"] * 1e3 / layers_n
    clean = dict(layer_us=stack_us(timed=False), score_select_us=stack_us(timed=False, attend_too=False),
                 score_us=time_ms(graph_of(lambda: [score(layer, args, folded_plan(layer, args)) for layer in layers]),
                                  args)["ms"] * 1e3 / layers_n)
    clean["select_us"] = clean["score_select_us"] - clean["score_us"]
    replay = graph_of(step)
    per_layer_us = time_ms(replay, args)["ms"] * 1e3 / layers_n
    rows = []  # (replay, layer) -> stamps (Hkv, 9)
    for _ in range(replays):
        replay()
        torch.cuda.synchronize()
        rows.append(torch.stack([s[:, :len(STAGES)].clone() for s in stamps]).cpu())
    stage_us = {name: [] for name in STAGES[2:]}
    wait_us, between_us = [], []
    for r in rows:
        for i in range(2, layers_n - 2):  # away from the graph's ends
            go = r[i, :, 1].min()
            for k, name in enumerate(STAGES[2:], start=2):
                stage_us[name].append((r[i, :, k].max() - go).item() / 1e3)
            wait_us.append((r[i, :, 1].max() - r[i, :, 0].min()).item() / 1e3)
            between_us.append((r[i + 1, :, 1].min() - r[i, :, len(STAGES) - 1].max()).item() / 1e3)
    med = statistics.median
    return dict(context=context, layers=layers_n, replays=replays, without_stamps=clean, per_layer_us=per_layer_us,
                since_go_us={k: med(v) for k, v in stage_us.items()},
                wait_us=med(wait_us), topk_end_to_next_topk_go_us=med(between_us))


def main() -> int:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--layers", type=int, default=24)
    extra.add_argument("--replays", type=int, default=20)
    extra.add_argument("--variants", default="default",
                       help="comma list: default, or wN (the top-k with N warps)")
    mine, rest = extra.parse_known_args()
    sys.argv = [sys.argv[0]] + rest
    args = parse_args()
    results = dict(meta=run_metadata(), stages=STAGES, runs=[])
    for text in args.contexts.split(","):
        context = parse_tokens(text.strip())
        for variant in mine.variants.split(","):
            warps = int(variant[1:]) if variant.startswith("w") else None
            run = timeline_for(context, args, mine.layers, mine.replays, warps)
            run["variant"] = variant
            results["runs"].append(run)
        print(json.dumps(run, indent=1), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
