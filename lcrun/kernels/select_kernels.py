"""Triton versions of the selection bookkeeping (lcrun.kernels.select holds the rules and the torch
versions): one tiny program each instead of a dozen torch launches per step and per layer."""
from __future__ import annotations

import torch

from lcrun.kernels.select import SelectionPlan
from lcrun.kernels.triton_support import jit, next_pow2, tl


@jit
def plan_bounds(ptr, FOLD: tl.constexpr, P: tl.constexpr, SINK_PAGES: tl.constexpr, WINDOW: tl.constexpr,
                BUDGET: tl.constexpr):
    """The step's plan inside a kernel: (seq_len, sink pages, first window page, top pages), int32.
    FOLD: ``ptr`` is seq_len and the plan is computed here (same arithmetic as
    select.selection_bounds; every quantity is non-negative, so // is floor), no plan launch;
    otherwise ``ptr`` is SelectionPlan.bounds and the plan is loaded."""
    if FOLD:
        n = tl.load(ptr)
        n_pages = (n + P - 1) // P
        n_sink = tl.minimum(n_pages, SINK_PAGES)
        window_first = tl.minimum(tl.maximum(n - WINDOW, 0) // P, n_pages - 1)
        window_first = tl.maximum(window_first, n_sink)
        forced_tokens = tl.minimum(n_sink * P, n) + tl.maximum(n - window_first * P, 0)
        n_top = tl.minimum(tl.maximum(BUDGET - forced_tokens, 0) // P, window_first - n_sink)
    else:
        n = tl.load(ptr + 0)
        n_sink = tl.load(ptr + 1)
        window_first = tl.load(ptr + 2)
        n_top = tl.load(ptr + 3)
    return n, n_sink, window_first, n_top


@jit
def quest_bound(q, low, high, head, stride_q_h, offs_d, D: tl.constexpr, G: tl.constexpr,
                REDUCE_MAX: tl.constexpr, ROWS: tl.constexpr):
    """Quest's upper bound of (ROWS,) pages for the G query heads of KV head ``head``, combined by
    max or sum: low/high (ROWS, BLOCK_D) fp32 key min/max already in registers, reused by every
    query head of the group."""
    if REDUCE_MAX:
        acc = tl.full([ROWS], float("-inf"), tl.float32)
    else:
        acc = tl.zeros([ROWS], tl.float32)
    for g in tl.static_range(G):
        qg = tl.load(q + (head * G + g) * stride_q_h + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)[None, :]
        bound = tl.sum(tl.maximum(qg * low, qg * high), axis=1)
        if REDUCE_MAX:
            acc = tl.maximum(acc, bound)
        else:
            acc = acc + bound
    return acc


@jit
def store_forced(page_table, sel_slots, sel_lens, head, stride_t, stride_sel, n, n_sink, window_first,
                 n_forced, n_top, P: tl.constexpr, KMAX: tl.constexpr, BLOCK_K: tl.constexpr):
    """Write the forced entries (sinks, then window) of a selection row and blank the unused ones
    after the n_top top entries (same layout as assemble_selection); the top entries are the
    caller's."""
    f_entry = tl.arange(0, BLOCK_K)
    f_forced = f_entry < n_forced
    f_page = tl.where((f_entry >= n_sink) & f_forced, window_first + f_entry - n_sink, f_entry)
    f_slot = tl.load(page_table + head * stride_t + f_page, mask=f_forced, other=0)
    f_len = tl.where(f_forced, tl.minimum(tl.maximum(n - f_page * P, 0), P), 0)
    f_keep = (f_entry < KMAX) & (f_forced | (f_entry >= n_forced + n_top))
    tl.store(sel_slots + head * stride_sel + f_entry, f_slot, mask=f_keep)
    tl.store(sel_lens + head * stride_sel + f_entry, f_len, mask=f_keep)


@jit
def _selection_bounds_kernel(seq_len, bounds, P: tl.constexpr, SINK_PAGES: tl.constexpr,
                             WINDOW: tl.constexpr, BUDGET: tl.constexpr):
    n, n_sink, window_first, n_top = plan_bounds(seq_len, True, P, SINK_PAGES, WINDOW, BUDGET)
    tl.store(bounds + 0, n)
    tl.store(bounds + 1, n_sink)
    tl.store(bounds + 2, window_first)
    tl.store(bounds + 3, n_top)


def plan_kernel_args(plan: SelectionPlan) -> tuple[torch.Tensor, dict]:
    """(pointer, constexprs) for kernels that call plan_bounds: the bounds tensor, or seq_len and
    the rules when the plan is folded (plan.bounds is None)."""
    if plan.bounds is not None:
        return plan.bounds, dict(FOLD=False, SINK_PAGES=0, WINDOW=0, BUDGET=0)
    assert plan.seq_len is not None and plan.seq_len.numel() == 1 and plan.seq_len.dtype == torch.int32
    return plan.seq_len, dict(FOLD=True, SINK_PAGES=-(-plan.sink_tokens // plan.page_size),
                              WINDOW=plan.window_tokens, BUDGET=plan.budget)


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
                     KMAX: tl.constexpr, BLOCK_K: tl.constexpr, P: tl.constexpr,
                     FOLD: tl.constexpr, SINK_PAGES: tl.constexpr, WINDOW: tl.constexpr, BUDGET: tl.constexpr):
    head = tl.program_id(0)
    entry = tl.arange(0, BLOCK_K)
    n, n_sink, window_first, n_top = plan_bounds(bounds, FOLD, P, SINK_PAGES, WINDOW, BUDGET)
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
    plan_ptr, plan_kw = plan_kernel_args(plan)
    _assemble_kernel[(hkv,)](
        top_pages, page_table, plan_ptr, sel_slots, sel_lens,
        top_pages.stride(0), page_table.stride(0), sel_slots.stride(0),
        KMAX=plan.kmax, BLOCK_K=next_pow2(plan.kmax), P=plan.page_size, num_warps=1, **plan_kw,
    )
    return sel_slots, sel_lens
