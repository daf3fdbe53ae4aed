"""Why window-position retrieval fails past the trained window: selection or attention?

Runs the passkey cell with window positions twice on the same samples: as lcrun selects, and with
an oracle that forces the needle's pages into every far selection (prefill and decode). Also
records, at the first decode step, in how many (layer, KV head) selections a needle page was.
If the oracle answers and lcrun does not, the page scores are what to fix.

    python perf/diag_window_oracle.py --length 32k --trials 10 --out perf/results/diag-oracle.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lcrun.runtime.generate import SamplingParams  # noqa: E402
from lcrun.runtime.window_cache import FAR_POSITIONS, WindowTopKCache  # noqa: E402
from perf.eval_longctx import Evaluator, Mode, parse_length  # noqa: E402
from perf.eval_tasks import grade  # noqa: E402
from lcrun.profiling.meta import run_metadata  # noqa: E402

_select = WindowTopKCache._select


def _patched_select(self, layer, q, pc):
    pages = _select(self, layer, q, pc)
    needle = [p for p in getattr(self, "needle_pages", []) if pc["sink_end"] // self.page_size <= p < pc["ls"] // self.page_size]
    hit = torch.zeros(pages.shape[:-1], dtype=torch.bool, device=pages.device)
    for p in needle:
        hit |= (pages == p).any(-1)
    if q.shape[0] == 1 and getattr(self, "first_decode", None) is not None and layer not in self.first_decode:
        self.first_decode[layer] = hit.float().mean().item() if needle else None
    if getattr(self, "oracle", False):
        for i, p in enumerate(needle[: pages.shape[-1]]):
            slot = pages.shape[-1] - 1 - i
            present = (pages == p).any(-1)
            pages[..., slot] = torch.where(present, pages[..., slot], torch.full_like(pages[..., slot], p))
    return pages


WindowTopKCache._select = _patched_select


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--length", default="32k")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--far-positions", default="paged", choices=FAR_POSITIONS)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    ev = Evaluator(args.model, budget=args.budget, far_positions=args.far_positions)
    length = parse_length(args.length)
    samples = ev.tasks.cell("passkey", length, args.trials)
    gen, _ = ev.generator(Mode.parse("topk:window"), length + max(s.max_new_tokens for s in samples) + 8)
    cache = gen.cache
    P = cache.page_size
    rows = []
    for s in samples:
        # The needle sentence is about 25 tokens: its first and the following page.
        cache.needle_pages = [s.needle_token // P, s.needle_token // P + 1]
        row = dict(depth=s.depth, needle_token=s.needle_token)
        for oracle in (False, True):
            cache.oracle, cache.first_decode = oracle, {}
            gen.reset()
            out = list(gen.stream(s.prompt_ids, SamplingParams(max_new_tokens=s.max_new_tokens), ev.tok.stop_ids))
            text = ev.tok.decode(out)
            key = "oracle" if oracle else "lcrun"
            row[key] = dict(score=grade(s, text), output=text)
            if not oracle:
                row["needle_selected_by_layer"] = [cache.first_decode.get(i) for i in range(ev.model.cfg.num_layers)]
        rows.append(row)
        print(f"depth {s.depth:.1f}: lcrun {row['lcrun']['score']:.0f} oracle {row['oracle']['score']:.0f} "
              f"needle selected (mean over layers/heads) "
              f"{sum(x for x in row['needle_selected_by_layer'] if x is not None) / ev.model.cfg.num_layers:.2f}",
              flush=True)
    doc = dict(meta=run_metadata(), settings=dict(ev.settings, length=length, trials=args.trials), rows=rows,
               accuracy=dict(lcrun=sum(r["lcrun"]["score"] for r in rows) / len(rows),
                             oracle=sum(r["oracle"]["score"] for r in rows) / len(rows)))
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["accuracy"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
