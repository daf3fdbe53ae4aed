"""Do random weights understate how often decode re-selects the same pages?

The tiered store's GPU page cache pays off when a step selects pages that recent steps selected
too. Speed runs use random weights (``synthetic:``); this compares the top pages (neither sink nor
window) that the demo model with its real weights and the same shapes with random weights select,
fed the same text (prefill, then teacher-forced decode steps):
- ``overlap``: share of a step's top pages (per layer and KV head) that the previous step selected;
- ``lru_hit_rate``: hit rate of those pages in an LRU cache per layer holding ``m`` times the
  pages (sinks and window included) one step selects in that layer;
- ``direct_mapped_hit_rate``: the same in a direct-mapped cache of that size, slot = (head *
  pages per head + page) mod size, as the tiered store maps pages (sinks and window pages take
  slots too; the first step fills the cache and is not counted);
- ``four_way_hit_rate``: a 4-way set-associative cache of that size (LRU inside a set).

    python -m perf.diag.selection_reuse --prefill 6000 --steps 128 --out perf/results/diag-reuse.json
"""
from __future__ import annotations

import argparse
import json
import time
from collections import OrderedDict
from pathlib import Path

import torch

from lcrun.construct import make_cache
from lcrun.config import LcrunConfig
from lcrun.eval import Evaluator, Mode
from lcrun.eval.text import stdlib_docs_text
from lcrun.profiling.meta import run_metadata
from lcrun.runtime.build import random_model
from lcrun.runtime.generate import Generator
from lcrun.runtime.synthetic import synthetic_config

CACHE_MULTIPLES = (1, 2, 4, 8, 16)


class SelectionRecorder:
    """Wraps a cache's kernel backend: between begin_step and end_step, every select_top_pages
    call (one per layer) appends the (Hkv, k) logical page ids it selected (-1: unused entry) and
    which of them are top pages (neither sink nor window). Needs an identity page table (the
    paged cache's, or the tiered store's logical one) and eager decode steps."""

    def __init__(self, ops):
        self._ops, self.pages, self.top, self._open = ops, [], [], False

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def begin_step(self) -> None:
        self.pages.append([])
        self.top.append([])
        self._open = True

    def end_step(self) -> None:
        self.pages[-1] = [p.cpu() for p in self.pages[-1]]
        self.top[-1] = [t.cpu() for t in self.top[-1]]
        self._open = False

    def select_top_pages(self, scores, table, plan, **kw):
        slots, lens = self._ops.select_top_pages(scores, table, plan, **kw)
        if self._open:
            # Identity tables: flat (slot h * max_pages + p, the paged cache) or logical (slot p, the
            # tiered store's): a head's page 0 sits at table[h, 0] either way.
            pages = slots.long() - table[:, :1].long()
            bounds = plan.device_bounds()
            used = lens > 0
            self.pages[-1].append(torch.where(used, pages, -1).to(torch.int32))
            self.top[-1].append(used & (pages >= bounds[1]) & (pages < bounds[2]))
        return slots, lens


def record_selections(ev: Evaluator, model, ids: list[int], n_prefill: int, steps: int) -> dict:
    """pages: per decode step, per layer, (Hkv, k) selected page ids (-1: unused entry); top: the
    same shape, True for top pages (neither sink nor window); max_pages: pages per KV head."""
    config = ev.cell_config(Mode.parse("topk:true"), n_prefill + steps + 8)
    cache = make_cache(config, model.cfg, ev.device, ev.dtype)
    gen = Generator(model, cache, config.prefill_chunk)
    recorder = cache.ops = SelectionRecorder(cache.ops)
    gen.prefill(ids[:n_prefill])
    with torch.inference_mode():
        for i in range(n_prefill, n_prefill + steps):
            recorder.begin_step()
            gen.stepper.step(torch.tensor([ids[i]], device=ev.device))
            recorder.end_step()
    return dict(pages=recorder.pages, top=recorder.top, max_pages=cache.max_pages)


def _step_keys(rec: dict, t: int, layer: int) -> list[tuple[int, bool]]:
    """(flat page id = head * pages per head + page, is a top page) for each page selected."""
    max_pages = rec["max_pages"]
    return [(h * max_pages + int(p), bool(is_top))
            for h, (row, trow) in enumerate(zip(rec["pages"][t][layer], rec["top"][t][layer]))
            for p, is_top in zip(row, trow) if p >= 0]


def set_associative_hit_rate(rec: dict, capacity: int, ways: int, top_only: bool = True) -> float:
    """Hit rate in caches of ``capacity`` slots per layer: sets of ``ways`` slots, set = flat page
    id mod (capacity // ways), LRU inside a set; ways=1 is the tiered store's direct-mapped
    cache. Every selected page is admitted; the first step fills the cache and is not counted."""
    hits = total = 0
    sets = max(1, capacity // ways)
    for layer in range(len(rec["pages"][0])):
        cache: dict[int, OrderedDict] = {}
        for t in range(len(rec["pages"])):
            keys = _step_keys(rec, t, layer)
            if t > 0:
                counted = [k for k, is_top in keys if is_top or not top_only]
                hits += sum(1 for k in counted if k in cache.get(k % sets, ()))
                total += len(counted)
            for k, _ in keys:
                lru = cache.setdefault(k % sets, OrderedDict())
                lru[k] = t
                lru.move_to_end(k)
                if len(lru) > ways:
                    lru.popitem(last=False)
    return hits / max(total, 1)


def lru_hit_rate(rec: dict, capacity: int, top_only: bool = True) -> float:
    """Fully associative: one set of ``capacity`` ways."""
    return set_associative_hit_rate(rec, capacity, capacity, top_only)


def overlap_with_previous_step(rec: dict) -> float:
    """Mean over steps, layers and KV heads of the share of top pages the previous step selected."""
    overlaps = []
    for t in range(1, len(rec["pages"])):
        for layer in range(len(rec["pages"][t])):
            for h, (row, trow) in enumerate(zip(rec["pages"][t][layer], rec["top"][t][layer])):
                now = {int(p) for p, is_top in zip(row, trow) if is_top}
                before = {int(p) for p in rec["pages"][t - 1][layer][h] if p >= 0}
                if now:
                    overlaps.append(len(now & before) / len(now))
    return sum(overlaps) / max(len(overlaps), 1)


def reuse_metrics(rec: dict) -> dict:
    layers = len(rec["pages"][0])
    per_step = sum(int(x.sum()) for x in rec["top"][-1]) / layers  # top pages per layer per step
    selected = sum(int((x >= 0).sum()) for x in rec["pages"][-1]) / layers  # all selected pages
    rates: dict[str, dict] = {"lru_hit_rate": {}, "direct_mapped_hit_rate": {}, "four_way_hit_rate": {}}
    for m in CACHE_MULTIPLES:
        capacity = max(1, int(m * selected))
        rates["lru_hit_rate"][f"{m}x"] = lru_hit_rate(rec, capacity)
        rates["direct_mapped_hit_rate"][f"{m}x"] = set_associative_hit_rate(rec, capacity, 1)
        rates["four_way_hit_rate"][f"{m}x"] = set_associative_hit_rate(rec, capacity, 4)
    return dict(overlap_with_previous_step=overlap_with_previous_step(rec), top_pages_per_layer_step=per_step,
                selected_pages_per_layer_step=selected, **rates)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="real model (default: the demo model)")
    ap.add_argument("--prefill", type=int, default=6000)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--out", required=True)
    ap.add_argument("--selections", default=None, help="torch file: saved to when missing, else loaded")
    args = ap.parse_args()
    t0 = time.perf_counter()
    ev = Evaluator(LcrunConfig(model=args.model, budget=args.budget))
    text, text_meta = stdlib_docs_text()
    ids = ev.tok.encode(text, add_special_tokens=False)
    random = random_model(synthetic_config("synthetic:smollm2-135m"), ev.device, ev.dtype)
    assert random.cfg.num_kv_heads == ev.model.cfg.num_kv_heads and random.cfg.num_layers == ev.model.cfg.num_layers
    result = dict(meta=run_metadata(), text=text_meta, settings=dict(ev.settings, prefill=args.prefill,
                  steps=args.steps, dtype=str(ev.dtype)), models={})
    saved = torch.load(args.selections) if args.selections and Path(args.selections).exists() else {}
    for name, model in (("real weights (" + Path(ev.spec).name + ")", ev.model),
                        ("random weights (synthetic:smollm2-135m)", random)):
        if name not in saved:
            saved[name] = record_selections(ev, model, ids, args.prefill, args.steps)
            if args.selections:
                torch.save(saved, args.selections)
        result["models"][name] = reuse_metrics(saved[name])
        print(name, json.dumps(result["models"][name]), f"({time.perf_counter() - t0:.0f} s)", flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
