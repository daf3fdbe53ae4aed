"""What do fp8 KV pages cost in quality? Teacher-forced fidelity of the tiered store (the path that
streams pages from host memory) with pages in the model dtype against the same store with fp8
(e4m3, per-head power-of-two scales) pages, both against dense attention, on a real model.

The tiered store is built directly (on a CPU the planner places the KV cache in one memory and
never tiers it), with a GPU page cache of ``--cache-slots`` per layer, so decode reads pages
through admission from the host pool as on the GPU. Runs: "topk" (the on-device paged top-k
cache, the reference point), "tiered" (model-dtype pages) and "tiered-fp8".

    python -m perf.diag.fp8_pages --length 4000 --steps 512 --budgets 1024,2048 --offsets 0,8000 \
        --out perf/results/diag-cpu-fp8-pages-4k.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lcrun.config import DEFAULT_PAGE_SIZE, LcrunConfig
from lcrun.eval import Evaluator, Mode, parse_length
from lcrun.eval.text import stdlib_docs_text
from lcrun.profiling.meta import run_metadata
from lcrun.runtime.generate import Generator
from lcrun.runtime.tiered import TieredTopKCache

VARIANTS = {"topk": None, "tiered": "model", "tiered-fp8": torch.float8_e4m3fn}


class TieredEvaluator(Evaluator):
    """Evaluator whose top-k mode runs on a TieredTopKCache (VARIANT picks its page dtype)."""
    variant: str = "topk"
    cache_slots: int = 256
    caches: list[TieredTopKCache] = []

    def generator(self, mode: Mode, ctx: int):
        store = VARIANTS[self.variant]
        if mode.attention != "topk" or store is None:
            return super().generator(mode, ctx)
        s = self.settings
        cache = TieredTopKCache(self.model.cfg, ctx, self.device, self.dtype, cache_slots_per_layer=self.cache_slots,
                                page_size=s["page_size"] or DEFAULT_PAGE_SIZE, budget=s["budget"], sink_tokens=s["sink_tokens"],
                                window_tokens=s["window_tokens"], group_score=s["group_score"], prefetch="off",
                                kv_dtype=None if store == "model" else store)
        self.caches.append(cache)
        return Generator(self.model, cache, s["prefill_chunk"]), "true"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--length", default="4000")
    ap.add_argument("--steps", type=int, default=512)
    ap.add_argument("--budgets", default="1024")
    ap.add_argument("--variants", default="topk,tiered,tiered-fp8", help="comma list of " + ", ".join(VARIANTS))
    ap.add_argument("--cache-slots", type=int, default=256, help="GPU page cache slots per layer of the tiered store")
    ap.add_argument("--offsets", default="0", help="comma list of token offsets into the text")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    text, text_meta = stdlib_docs_text()
    results = dict(meta=run_metadata(), text=text_meta, cache_slots=args.cache_slots, runs=[])
    out = Path(args.out)
    t0 = time.perf_counter()
    for budget in (int(b) for b in args.budgets.split(",")):
        ev = TieredEvaluator(LcrunConfig(model=args.model, budget=budget))
        ev.cache_slots = args.cache_slots
        ids = ev.tok.encode(text, add_special_tokens=False)
        for kind in args.variants.split(","):
            ev.variant = kind
            for off in (int(o) for o in args.offsets.split(",")):
                ev.caches.clear()
                r = ev.fidelity(ids[off:], parse_length(args.length), args.steps, Mode.parse("topk:true"))
                r.update(budget=budget, variant=kind, offset=off)
                if ev.caches:
                    rep = ev.caches[-1].report()
                    r.update(hit_rate=rep["hit_rate"], kv_dtype=rep["kv_dtype"])
                    ev.caches[-1].close()
                results["runs"].append(r)
                print(json.dumps({k: r[k] for k in ("budget", "variant", "offset", "top1_agreement", "mean_kl",
                                                    "seconds")}), flush=True)
                out.write_text(json.dumps(results, indent=1))
    summary = {}
    for r in results["runs"]:
        key = f"{r['variant']}@{r['budget']}"
        summary.setdefault(key, []).append(r)
    results["summary"] = {k: dict(top1_agreement=sum(x["top1_agreement"] for x in v) / len(v),
                                  mean_kl=sum(x["mean_kl"] for x in v) / len(v), windows=len(v))
                          for k, v in summary.items()}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
