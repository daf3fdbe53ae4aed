"""Does a first-order estimate of the attention to the pages top-k leaves out raise fidelity?

Runs the teacher-forced fidelity test (lcrun.eval) with lcrun's stock Quest top-k decode
("quest") and with a "tail estimate" added ("quest+tail"): in every decode step of every top-k
layer (flat selection), each candidate page of a KV head that the selection did not keep (a full
page, neither sink nor window, not among the top pages) joins the attention as one pseudo-token
with key = mean of the page's keys (post-RoPE, as stored in the pool), value = mean of its values,
and weight = the page's token count P (its logit gets + log P). The output is exact softmax
attention over {selected tokens} + {pseudo-tokens} per query head (query head h uses KV head h // G).

Plain torch (the CPU path); the attention with the tail switched off is checked against the stock
sparse_decode_attention at the start of every run.

    python -m perf.diag.fidelity_tail --length 4000 --steps 256 --budgets 1024 \
        --offsets 0,4000,8000,12000 --variants quest,tail --out perf/results/diag-cpu-fidelity-tail-4k.json
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from lcrun.config import LcrunConfig
from lcrun.eval import Evaluator, Mode, parse_length
from lcrun.eval.text import stdlib_docs_text
from lcrun.profiling.meta import run_metadata
from lcrun.runtime.paged_cache import PagedTopKCache

CHECK_CALLS = 64  # decode attention calls per cache compared against the stock kernel (tail off)


def tail_attention(q, k_pool, v_pool, table, slots, lens, bounds, num_full, sm_scale, tail=True):
    """q: (Hq, D); k_pool/v_pool: (slots, P, D) of one layer; table: (Hkv, max_pages) int32;
    slots/lens: (Hkv, Kmax) the selection; bounds: (seq_len, n_sink, window_first, n_top).
    Softmax attention over the selected tokens plus, with ``tail``, one pseudo-token per unselected
    candidate page (mean key, mean value, logit + log P). Returns (Hq, D) in q's dtype."""
    hq, d = q.shape
    hkv, kmax = slots.shape
    P = k_pool.shape[1]
    G = hq // hkv
    lo = int(bounds[1])
    hi = min(int(bounds[2]), int(num_full.reshape(-1)[0]))
    qg = q.float().reshape(hkv, G, d)
    outs = []
    for h in range(hkv):
        valid = lens[h] > 0
        s = slots[h][valid].long()
        n = lens[h][valid].long()
        live = torch.arange(P)[None, :] < n[:, None]  # (e, P)
        keys = k_pool[s].float()[live]  # (N, D)
        vals = v_pool[s].float()[live]
        logits = qg[h] @ keys.T * sm_scale  # (G, N)
        pvals = None
        if tail and hi > lo:
            pages = torch.arange(lo, hi)
            phys = table[h, pages].long()
            unselected = ~(phys[:, None] == s[None, :]).any(1)
            phys = phys[unselected]
            if phys.numel():
                kpage, vpage = k_pool[phys].float(), v_pool[phys].float()  # (u, P, D)
                kbar, vbar = kpage.mean(1), vpage.mean(1)  # (u, D)
                plog = qg[h] @ kbar.T * sm_scale + math.log(P)  # (G, u)
                pvals = vbar.expand(G, -1, -1)
                if tail in ("mass", "value", "exact"):  # diagnostics: parts of the estimate made exact
                    true = torch.einsum("gd,upd->gup", qg[h], kpage) * sm_scale  # (G, u, P)
                    if tail in ("mass", "exact"):
                        plog = torch.logsumexp(true, -1)
                    if tail in ("value", "exact"):
                        pvals = torch.einsum("gup,upd->gud", torch.softmax(true, -1), vpage)
                logits = torch.cat([logits, plog], dim=1)
        probs = torch.softmax(logits, dim=-1)
        o = probs[:, :vals.shape[0]] @ vals  # (G, D)
        if pvals is not None:
            o = o + torch.einsum("gu,gud->gd", probs[:, vals.shape[0]:], pvals)
        outs.append(o)
    return torch.cat(outs, 0).to(q.dtype)


class TailOps:
    """The cache's kernel backend with sparse_decode_attention replaced by tail_attention for the
    top-k layers (the call that follows select_top_pages); dense-layer calls (num_entries given)
    and prefill pass through."""

    def __init__(self, ops, cache: PagedTopKCache):
        self._ops, self._cache = ops, cache
        self._last = None
        self.checked = 0
        self.tail_calls = 0
        self.tail_pages = 0

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def select_top_pages(self, scores, table, plan, *a, **kw):
        slots, lens = self._ops.select_top_pages(scores, table, plan, *a, **kw)
        self._last = (slots, lens, table, plan)
        return slots, lens

    def sparse_decode_attention(self, q, k_pool, v_pool, slots, lens, sm_scale=None, num_entries=None, **kw):
        last = self._last
        if num_entries is not None or last is None or last[0] is not slots:
            return self._ops.sparse_decode_attention(q, k_pool, v_pool, slots, lens, sm_scale, num_entries, **kw)
        _, _, table, plan = last
        self._last = None
        cache = self._cache
        bounds = [int(x) for x in plan.device_bounds().tolist()]
        if self.checked < CHECK_CALLS:  # tail off must be the stock kernel
            stock = self._ops.sparse_decode_attention(q, k_pool, v_pool, slots, lens, sm_scale)
            mine = tail_attention(q, k_pool, v_pool, table, slots, lens, bounds, cache._num_full, sm_scale, tail=False)
            torch.testing.assert_close(mine.float(), stock.float(), rtol=1e-4, atol=1e-5)
            self.checked += 1
        if TAIL is None:  # stock quest: the stock kernel's output
            return self._ops.sparse_decode_attention(q, k_pool, v_pool, slots, lens, sm_scale, **kw)
        self.tail_calls += 1
        self.tail_pages += max(0, min(bounds[2], int(cache._num_full[0])) - bounds[1] - bounds[3])
        return tail_attention(q, k_pool, v_pool, table, slots, lens, bounds, cache._num_full, sm_scale, tail=TAIL)


_init = PagedTopKCache.__init__
CACHES: list[TailOps] = []


def _tail_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    assert not self.chunk_pages, "the tail estimate is implemented for flat selection only"
    self.ops = TailOps(self.ops, self)
    CACHES.append(self.ops)


TAIL = None  # None: stock quest; else the tail kind of VARIANTS


VARIANTS = {"quest": None,        # stock top-k
            "tail": "mean",       # + one pseudo-token per unselected page: mean key, mean value, logit + log P
            "tail-mass": "mass",  # diagnostic: pseudo-token logit = the page's exact log-sum-exp, value = mean value
            "tail-value": "value",  # diagnostic: mean-key logit + log P, value = the page's exact weighted value
            "tail-exact": "exact"}  # check: both exact, i.e. dense attention (tests the page bookkeeping)


def main() -> int:
    global TAIL
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--length", default="4000")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--budgets", default="1024")
    ap.add_argument("--variants", default="quest,tail", help="comma list of " + ", ".join(VARIANTS))
    ap.add_argument("--window-tokens", type=int, default=512)
    ap.add_argument("--offsets", default="0", help="comma list of token offsets into the text")
    ap.add_argument("--out", required=True)
    ap.add_argument("--append", action="store_true", help="add runs to an existing --out file")
    args = ap.parse_args()
    PagedTopKCache.__init__ = _tail_init  # here, not at import: importing this module changes nothing
    torch.manual_seed(0)
    text, text_meta = stdlib_docs_text()
    out = Path(args.out)
    results = json.loads(out.read_text()) if args.append and out.exists() else \
        dict(meta=run_metadata(), text=text_meta, runs=[])
    t0 = time.perf_counter()
    for budget in (int(b) for b in args.budgets.split(",")):
        ev = Evaluator(LcrunConfig(model=args.model, budget=budget, window_tokens=args.window_tokens))
        ids = ev.tok.encode(text, add_special_tokens=False)
        for kind in args.variants.split(","):
            TAIL = VARIANTS[kind]
            for off in (int(o) for o in args.offsets.split(",")):
                CACHES.clear()
                w0 = time.perf_counter()
                r = ev.fidelity(ids[off:], parse_length(args.length), args.steps, Mode.parse("topk:true"))
                ops = [c for c in CACHES if c.checked]
                r.update(budget=budget, variant=kind, offset=off,
                         window_tokens=args.window_tokens, wall_s=round(time.perf_counter() - w0, 1),
                         checked_calls=sum(c.checked for c in ops),
                         mean_unselected_pages=round(sum(c.tail_pages for c in ops) / max(1, sum(c.tail_calls for c in ops)), 2),
                         run_date=run_metadata()["date"])
                results["runs"].append(r)
                print(f"L {args.length} budget {budget} {r['variant']:10s} offset {off}: top-1 {r['top1_agreement']:.4f} "
                      f"KL {r['mean_kl']:.5f} ({r['wall_s']} s, total {time.perf_counter() - t0:.0f} s)", flush=True)
                out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
