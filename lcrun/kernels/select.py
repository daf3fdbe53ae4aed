"""Which pages each KV head attends to in a decode step: sinks + window + top-scoring pages.

Rules (all counts inside the budget B tokens):
- sink pages: the first ceil(S / P) pages (whole pages, so up to P - 1 tokens past S);
- window pages: from the page holding token seq_len - W through the last page, which is the
  partial page when seq_len is not a multiple of P (the last page is always attended in full,
  even with W = 0, since it has no abstract);
- top pages: the full pages that are neither sink nor window, ranked by score; as many as fit
  in the tokens the forced pages leave: (B - forced tokens) // P.
Hence, with seq_len <= B, every page is selected (dense). Forced pages are kept even if their
tokens exceed B, which only happens when B < ceil(S/P)*P + W + P - 1.

Output: a fixed number of entries per KV head, Kmax = max(B // P + 1, ceil(S/P) + ceil(W/P) + 1)
(at most max_pages). The ``+ 1`` is the slack for the partial last page: tokens <= B with one
partial page allows B // P full pages plus that page. Entries are laid out
[sinks | window | top | unused]; unused entries have slot 0 and length 0.

Everything except the top-k depends only on seq_len, so ``plan_selection`` runs once per decode
step, and per layer ``select_with_plan`` runs a top-k and one assembly step (a Triton kernel on
the GPU, torch ops on CPU: the ``assemble`` argument). A backend's ``select_top_pages`` does the
same in one launch on the GPU (lcrun.kernels.topk), ``select_top_pages`` below on CPU. All on the
device, no host synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch



def max_entries(page_size: int, sink_tokens: int, window_tokens: int, budget: int) -> int:
    """Kmax: selected entries per KV head (see the module docstring)."""
    sink_pages = -(-sink_tokens // page_size)
    window_pages = -(-window_tokens // page_size) + 1
    return max(budget // page_size + 1, sink_pages + window_pages)


@dataclass
class SelectionPlan:
    """Per-step selection metadata shared by every layer."""
    page_size: int
    kmax: int              # entries per KV head
    top_k: int             # k of the top-k call: min(kmax, max_pages)
    bounds: torch.Tensor | None  # (4,) int32 on the device: seq_len, sink pages, first window page, top pages
    # Candidates for the top-k are the pages in [bounds[1], bounds[2]): full, neither sink nor window.
    # Folded plan (plan_selection(fold=True)): bounds is None and the Triton kernels compute them
    # from seq_len and the rules below (no plan launch); device_bounds() computes them for torch.
    seq_len: torch.Tensor | None = None
    sink_tokens: int = 0
    window_tokens: int = 0
    budget: int = 0

    def device_bounds(self) -> torch.Tensor:
        """bounds, computed with torch ops when the plan is folded."""
        if self.bounds is not None:
            return self.bounds
        return selection_bounds(self.seq_len, self.page_size, self.sink_tokens, self.window_tokens, self.budget)


def selection_bounds(seq_len: torch.Tensor, page_size: int, sink_tokens: int, window_tokens: int,
                     budget: int) -> torch.Tensor:
    """Torch version: seq_len (1,) int32 -> bounds (4,) int32 (see SelectionPlan)."""
    P = page_size
    n = seq_len.reshape(1).long()
    n_pages = (n + P - 1) // P
    n_sink = torch.clamp(n_pages, max=-(-sink_tokens // P))
    window_first = torch.minimum(torch.clamp(n - window_tokens, min=0) // P, n_pages - 1)
    window_first = torch.maximum(window_first, n_sink)  # pages already forced as sinks count once
    forced_tokens = torch.clamp(n_sink * P, max=n) + torch.clamp(n - window_first * P, min=0)
    n_top = torch.minimum(torch.clamp(budget - forced_tokens, min=0) // P, window_first - n_sink)
    return torch.cat([n, n_sink, window_first, n_top]).to(torch.int32)


def plan_selection(seq_len: torch.Tensor, max_pages: int, page_size: int, sink_tokens: int,
                   window_tokens: int, budget: int, bounds_fn: Callable = selection_bounds,
                   fold: bool = False) -> SelectionPlan:
    """seq_len: 1-element int32 device tensor, tokens cached including the current one.
    bounds_fn: a backend's selection_bounds (one Triton program on the GPU).
    fold: launch nothing; the Triton kernels that take the plan (score_pages(candidates=plan),
    select_top_pages, the hierarchical selection) compute the bounds from seq_len themselves."""
    kmax = min(max_entries(page_size, sink_tokens, window_tokens, budget), max_pages)
    bounds = None if fold else bounds_fn(seq_len, page_size, sink_tokens, window_tokens, budget)
    return SelectionPlan(page_size=page_size, kmax=kmax, top_k=kmax, bounds=bounds, seq_len=seq_len,
                         sink_tokens=sink_tokens, window_tokens=window_tokens, budget=budget)


def candidate_mask(bounds: torch.Tensor, max_pages: int) -> torch.Tensor:
    """(1, max_pages) bool: the pages that compete for the budget."""
    pages = torch.arange(max_pages, device=bounds.device)
    return ((pages >= bounds[1]) & (pages < bounds[2]))[None, :]


def assemble_selection(top_pages: torch.Tensor, page_table: torch.Tensor,
                       plan: SelectionPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch version of the assembly: entries [sinks | window | top | unused] -> slots, lens.
    top_pages: (Hkv, top_k) int64, candidate pages by falling score."""
    hkv = page_table.shape[0]
    P, kmax = plan.page_size, plan.kmax
    n, n_sink, window_first, n_top = plan.device_bounds().long().unbind()
    entry = torch.arange(kmax, device=page_table.device)
    n_forced = n_sink + (n + P - 1) // P - window_first
    is_window = (entry >= n_sink) & (entry < n_forced)
    is_top = (entry >= n_forced) & (entry < n_forced + n_top)
    top = top_pages.gather(1, torch.clamp(entry - n_forced, 0, plan.top_k - 1)[None, :].expand(hkv, -1))
    page = torch.where(is_top, top, torch.where(is_window, window_first + entry - n_sink, entry))
    valid = (entry < n_forced) | is_top
    slots = torch.where(valid, page_table.gather(1, page), 0).to(torch.int32)
    lens = torch.where(valid, torch.clamp(n - page * P, 0, P), 0).to(torch.int32)
    return slots, lens


def select_with_plan(scores: torch.Tensor, page_table: torch.Tensor, plan: SelectionPlan,
                     assemble: Callable = assemble_selection,
                     masked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """scores: (Hkv, max_pages) fp32 from score_pages (finite for full pages); page_table:
    (Hkv, max_pages) int32. Returns sel_slots, sel_lens: (Hkv, Kmax) int32 (physical slot, valid
    tokens; slot 0 and length 0 when unused). ``assemble``: a backend's assemble_selection;
    ``masked``: scores are already -inf outside the candidates (score_pages(candidates=bounds))."""
    hkv, max_pages = scores.shape
    assert page_table.shape == (hkv, max_pages) and page_table.dtype == torch.int32
    if not masked:  # forced and non-full pages drop to -inf, below every (finite) candidate score
        scores = torch.where(candidate_mask(plan.device_bounds(), max_pages), scores, float("-inf"))
    top_pages = torch.topk(scores, plan.top_k, dim=1, sorted=True).indices
    return assemble(top_pages, page_table, plan)


def select_top_pages(scores: torch.Tensor, page_table: torch.Tensor, plan: SelectionPlan,
                     masked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch path of a backend's ``select_top_pages`` (the Triton one is lcrun.kernels.topk: one
    launch for top-k + assembly): torch.topk + assemble_selection. Same arguments as select_with_plan."""
    return select_with_plan(scores, page_table, plan, assemble_selection, masked=masked)


def select_pages(scores: torch.Tensor, page_table: torch.Tensor, seq_len: torch.Tensor, page_size: int,
                 sink_tokens: int, window_tokens: int, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One-shot selection (plan + select, torch ops); see the module docstring."""
    plan = plan_selection(seq_len, scores.shape[1], page_size, sink_tokens, window_tokens, budget)
    return select_with_plan(scores, page_table, plan)
