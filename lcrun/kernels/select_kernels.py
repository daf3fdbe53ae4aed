"""Triton versions of the selection bookkeeping (lcrun.kernels.select holds the rules and the torch
versions): one tiny program each instead of a dozen torch launches per step and per layer."""
from __future__ import annotations

import torch

from lcrun.kernels.select import SelectionPlan
from lcrun.kernels.triton_support import jit, next_pow2, tl


@jit
def _selection_bounds_kernel(seq_len, bounds, P: tl.constexpr, SINK_PAGES: tl.constexpr,
                             WINDOW: tl.constexpr, BUDGET: tl.constexpr):
    # Same arithmetic as select.selection_bounds; every quantity is non-negative, so // is floor.
    n = tl.load(seq_len)
    n_pages = (n + P - 1) // P
    n_sink = tl.minimum(n_pages, SINK_PAGES)
    window_first = tl.minimum(tl.maximum(n - WINDOW, 0) // P, n_pages - 1)
    window_first = tl.maximum(window_first, n_sink)
    forced_tokens = tl.minimum(n_sink * P, n) + tl.maximum(n - window_first * P, 0)
    n_top = tl.minimum(tl.maximum(BUDGET - forced_tokens, 0) // P, window_first - n_sink)
    tl.store(bounds + 0, n)
    tl.store(bounds + 1, n_sink)
    tl.store(bounds + 2, window_first)
    tl.store(bounds + 3, n_top)


def selection_bounds(seq_len: torch.Tensor, page_size: int, sink_tokens: int, window_tokens: int,
                     budget: int) -> torch.Tensor:
    """seq_len: (1,) int32 device tensor -> bounds (4,) int32: seq_len, sink pages, first window
    page, top pages to take (see lcrun.kernels.select)."""
    assert seq_len.numel() == 1 and seq_len.dtype == torch.int32
    bounds = torch.empty(4, device=seq_len.device, dtype=torch.int32)
    _selection_bounds_kernel[(1,)](seq_len, bounds, P=page_size, SINK_PAGES=-(-sink_tokens // page_size),
                                   WINDOW=window_tokens, BUDGET=budget, num_warps=1)
    return bounds


@jit
def _assemble_kernel(top_pages, page_table, bounds, sel_slots, sel_lens,
                     stride_top_h, stride_table_h, stride_sel_h,
                     KMAX: tl.constexpr, BLOCK_K: tl.constexpr, P: tl.constexpr):
    head = tl.program_id(0)
    entry = tl.arange(0, BLOCK_K)
    n = tl.load(bounds + 0)
    n_sink = tl.load(bounds + 1)
    window_first = tl.load(bounds + 2)
    n_top = tl.load(bounds + 3)
    n_forced = n_sink + (n + P - 1) // P - window_first
    is_window = (entry >= n_sink) & (entry < n_forced)
    is_top = (entry >= n_forced) & (entry < n_forced + n_top)
    top = tl.load(top_pages + head * stride_top_h + (entry - n_forced), mask=is_top, other=0).to(tl.int32)
    page = tl.where(is_top, top, tl.where(is_window, window_first + entry - n_sink, entry))
    valid = (entry < n_forced) | is_top
    slot = tl.load(page_table + head * stride_table_h + page, mask=valid, other=0)
    length = tl.where(valid, tl.minimum(tl.maximum(n - page * P, 0), P), 0)
    out = head * stride_sel_h + entry
    tl.store(sel_slots + out, slot, mask=entry < KMAX)
    tl.store(sel_lens + out, length, mask=entry < KMAX)


def assemble_selection(top_pages: torch.Tensor, page_table: torch.Tensor,
                       plan: SelectionPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """top_pages: (Hkv, top_k) int64 candidate pages by falling score (torch.topk indices);
    page_table: (Hkv, max_pages) int32 -> sel_slots, sel_lens (Hkv, Kmax) int32, laid out
    [sinks | window | top | unused]."""
    hkv = page_table.shape[0]
    assert top_pages.dim() == 2 and top_pages.shape == (hkv, plan.top_k) and top_pages.stride(1) == 1
    assert page_table.dtype == torch.int32 and page_table.stride(1) == 1
    sel_slots = torch.empty((hkv, plan.kmax), device=page_table.device, dtype=torch.int32)
    sel_lens = torch.empty_like(sel_slots)
    _assemble_kernel[(hkv,)](
        top_pages, page_table, plan.bounds, sel_slots, sel_lens,
        top_pages.stride(0), page_table.stride(0), sel_slots.stride(0),
        KMAX=plan.kmax, BLOCK_K=next_pow2(plan.kmax), P=plan.page_size, num_warps=1,
    )
    return sel_slots, sel_lens
