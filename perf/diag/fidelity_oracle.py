"""How much of the teacher-forced top-1 disagreement is the page *scores*, and how much the budget?

Runs the fidelity test (lcrun.eval) with lcrun's Quest page scores and with an oracle that
ranks each candidate page by the attention mass the real query puts on it (softmax over the whole
context, max over the GQA group): the best any page selection can do inside the same budget.
If the oracle is far better, the scores are what to fix; if not, the budget is.

    python -m perf.diag.fidelity_oracle --length 4000 --steps 256 --budgets 1024,2048 \
        --out perf/results/diag-fidelity-oracle-4k.json
    python -m perf.diag.fidelity_oracle --length 8000 --steps 512 --offsets 0,8000 --page-size 16 \
        --out perf/results/diag-fidelity-oracle-8k-page16.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lcrun.config import LcrunConfig
from lcrun.eval import Evaluator, Mode, parse_length
from lcrun.eval.text import stdlib_docs_text
from lcrun.profiling.meta import run_metadata
from lcrun.runtime.paged_cache import PagedTopKCache


class OracleOps:
    """The cache's kernel backend with score_pages replaced by the true attention mass per page
    ("oracle"), by the query's dot product with the page's key centre ("centroid"), or by the
    Quest bounds normalised per query head (log-softmax over pages) before the max over the GQA
    group ("softmax"), so a head with a large query norm does not rank pages for the whole group;
    "rerankN": the oracle's order among the N x k pages Quest's bound ranks best (what re-scoring
    a shortlist with the real keys would reach)."""

    def __init__(self, ops, cache: PagedTopKCache, kind: str):
        self._ops, self._cache, self._kind = ops, cache, kind

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def score_pages(self, q, kmin, kmax, num_full, group_reduce="max", candidates=None, **kw):
        if self._kind == "softmax":  # Quest bounds as logits, normalised per query head, then max over the group
            hkv, max_pages, d = kmin.shape
            qg = q.float().reshape(hkv, -1, 1, d)
            bound = torch.maximum(qg * kmin[:, None].float(), qg * kmax[:, None].float()).sum(-1)  # (Hkv, G, pages)
            full = torch.arange(max_pages) < int(num_full.reshape(-1)[0])
            logits = torch.where(full, bound * self._cache.sm_scale, float("-inf"))
            return _candidates_only(torch.log_softmax(logits, dim=-1).amax(1), candidates, num_full)[0]
        if self._kind == "centroid":
            centre = (kmin.float() + kmax.float()) * 0.5
            return self._ops.score_pages(q, centre, centre, num_full, group_reduce, candidates=candidates, **kw)
        cache = self._cache
        layer = next(i for i in range(cache.kmin.shape[0]) if cache.kmin[i].data_ptr() == kmin.data_ptr())
        hkv, max_pages, d = kmin.shape
        P = cache.page_size
        seq_len = int(cache._seq_len.item())
        keys = cache.k_pool[layer][cache.page_table[layer].long()]  # (Hkv, pages, P, D)
        keys = keys.reshape(hkv, max_pages * P, d)[:, :seq_len].float()
        qg = q.float().reshape(hkv, -1, d)
        probs = torch.softmax(qg @ keys.transpose(1, 2) * cache.sm_scale, dim=-1)  # (Hkv, G, T)
        pad = max_pages * P - seq_len
        mass = torch.nn.functional.pad(probs, (0, pad)).reshape(hkv, -1, max_pages, P).sum(-1)
        scores, n_candidates, n_top = _candidates_only(mass.amax(1) if group_reduce == "max" else mass.sum(1),
                                                       candidates, num_full)
        if self._kind.startswith("rerank"):  # the oracle's order among Quest's best RERANK x k pages only
            quest = self._ops.score_pages(q, kmin, kmax, num_full, group_reduce, candidates=candidates, **kw)
            n = min(int(self._kind[len("rerank"):]) * n_top, n_candidates)
            shortlist = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, quest.topk(max(n, 1), dim=1).indices, True)
            scores = torch.where(shortlist, scores, float("-inf"))
        return scores


def _candidates_only(scores, candidates, num_full) -> tuple[torch.Tensor, int, int]:
    """scores with -inf outside the plan's candidate pages (full, neither sink nor window), the
    number of candidates, and the number of top pages the plan keeps."""
    bounds = candidates.device_bounds() if hasattr(candidates, "device_bounds") else candidates
    lo, hi = int(bounds[1]), min(int(bounds[2]), int(num_full.reshape(-1)[0]))
    rows = torch.arange(scores.shape[-1])
    return torch.where(((rows >= lo) & (rows < hi))[None], scores, float("-inf")), max(hi - lo, 0), int(bounds[3])


_init = PagedTopKCache.__init__


def _oracle_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if SCORES != "quest":
        self.ops = OracleOps(self.ops, self, SCORES)


SCORES = "quest"


def retrieval(args) -> int:
    """A retrieval cell (e.g. niah_multivalue:4k:20) with each scorer, on the same samples."""
    global SCORES
    task, length, trials = args.retrieval.split(":")
    results = dict(meta=run_metadata(), retrieval=args.retrieval, cells=[])
    t0 = time.perf_counter()
    for budget in (int(b) for b in args.budgets.split(",")):
        ev = Evaluator(LcrunConfig(model=args.model, budget=budget, window_tokens=args.window_tokens))
        for kind in args.scores.split(","):
            SCORES = kind
            cell = ev.run_cell(task, parse_length(length), Mode.parse("topk:true"), int(trials))
            cell.update(budget=budget, scores=kind)
            results["cells"].append(cell)
            print(f"{task} {length} budget {budget} {kind}: accuracy {cell['accuracy']} over {cell['trials']} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


def main() -> int:
    global SCORES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--length", default="4000")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--budgets", default="1024")
    ap.add_argument("--scores", default="quest,oracle", help="comma list of quest, oracle, centroid, softmax, rerankN (rerank2, ...)")
    ap.add_argument("--window-tokens", type=int, default=512)
    ap.add_argument("--page-size", type=int, default=32)
    ap.add_argument("--offsets", default="0", help="comma list of token offsets into the text (more samples)")
    ap.add_argument("--retrieval", default=None, metavar="TASK:LENGTH:TRIALS",
                    help="instead of the fidelity test, run a retrieval cell (top-k, true positions) per scorer")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    PagedTopKCache.__init__ = _oracle_init  # here, not at import: importing this module changes nothing
    if args.retrieval:
        return retrieval(args)
    text, text_meta = stdlib_docs_text()
    results = dict(meta=run_metadata(), text=text_meta, length=args.length, steps=args.steps, runs=[])
    t0 = time.perf_counter()
    for budget in (int(b) for b in args.budgets.split(",")):
        ev = Evaluator(LcrunConfig(model=args.model, budget=budget, window_tokens=args.window_tokens,
                                    page_size=args.page_size))
        ids = ev.tok.encode(text, add_special_tokens=False)
        for kind in args.scores.split(","):
            SCORES = kind
            for off in (int(o) for o in args.offsets.split(",")):
                r = ev.fidelity(ids[off:], parse_length(args.length), args.steps, Mode.parse("topk:true"))
                r.update(budget=budget, scores=kind, offset=off, window_tokens=args.window_tokens, page_size=args.page_size)
                results["runs"].append(r)
                print(f"budget {budget} window {args.window_tokens} {kind:8s} offset {off}: top-1 {r['top1_agreement']:.4f} "
                      f"KL {r['mean_kl']:.5f} ({time.perf_counter() - t0:.0f} s)", flush=True)
                Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
