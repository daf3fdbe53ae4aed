"""Exact top-k page selection in ONE Triton launch per layer (one program per KV head), with the
selection assembly fused: it writes sel_slots/sel_lens ([sinks | window | top | unused]) directly.

Replaces torch.topk (a multi-kernel radix select: 41 us of a 65 us decode layer at 128K on an H100)
plus the assembly kernel. The row of one KV head (max_pages fp32 scores, at most 64K pages) lives in
the registers of one program; scores become order-preserving int32 keys, ties are broken by the
smaller page index, so the result is exact and deterministic: the first k of the order
(score desc, page asc), sorted that way.

Algorithm (k << row length: k = 46 of up to 32K candidate pages at Llama-3.1-8B, budget 2048):
1. Threshold: split the row into GROUPS strided groups (page i in group i % GROUPS, so a run of hot
   neighbouring pages lands in different groups) and take each group's max. The k-th largest group
   max T is a lower bound of the k-th largest score (k distinct pages reach it), so every winner
   is >= T. For i.i.d. scores about GROUPS * -ln(1 - k / GROUPS) pages pass (57 for k = 46 and 128
   groups); one GROUPS x GROUPS comparison gives T exactly.
2. Compact the pages that pass into a CAP-entry scratch row (page and key; slot = pages passing
   in the groups before + in the same group before: prefix sums of the GROUPS counts and along
   each group, not over the row, whose scan would need a row-sized shared-memory buffer) and rank
   them by a comparison block: rank = pages ahead in the order. Winners (rank < k) go straight
   to entry n_forced + rank. The block is CAP/2 x CAP/2 when at most CAP/2 pass (the usual case:
   in Triton 3.6 on an H200, ranking 128 keys took 3.3 us inside a decode graph, 64 keys 0.5).
3. Fallback when more than CAP pages pass (many ties at T, adversarial rows): the exact winners by
   two bisections of counts over the row (the k-th largest key, 32 steps, then a page bound for
   the ties at it, 17 steps), compacted and ranked as in 2. Slower, never wrong.

The plan of the step (seq_len, sink pages, first window page, top pages: SelectionPlan.bounds) is
read from the device, so nothing syncs with the host and the launch replays in a CUDA graph.
"""
from __future__ import annotations

import torch

from lcrun.kernels.select import SelectionPlan
from lcrun.kernels.select_kernels import plan_bounds, plan_kernel_args, store_forced
from lcrun.kernels.triton_support import jit, next_pow2, pdl_enabled, pdl_launch, pdl_wait, timer_after, tl

MAX_ROW = 1 << 16  # pages per KV head held in one program's registers (2M tokens at P = 32)
INT_MIN = tl.constexpr(-2147483648)
INT_MAX = tl.constexpr(2147483647)
MAX_ROW_C = tl.constexpr(MAX_ROW)
METHODS = ("filter", "bisect")  # bisect: always take the fallback (tests, benchmarks)


@jit
def _keys(x):
    """fp32 -> int32 with the same order (-0.0 just below +0.0; no NaN in scores)."""
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@jit
def _count(mask):
    return tl.sum(tl.sum(mask.to(tl.int32), axis=1), axis=0)


@jit
def _stamp(timeline, stage: tl.constexpr, dep, TIMELINE: tl.constexpr):
    """Diagnostics (TIMELINE): timeline[stage] = when the last thread had computed ``dep``."""
    if TIMELINE:
        t = timer_after(dep.to(tl.int32))
        if len(t.shape) == 2:
            t = tl.max(tl.max(t, axis=1), axis=0)
        elif len(t.shape) == 1:
            t = tl.max(t, axis=0)
        tl.store(timeline + stage, t)


@jit
def _exact_winners(s, idx, n_top):
    """Fallback over the (GROUPS, ROWS) tile of keys: the exact first n_top of the order (key desc, page
    asc), as a mask. Two bisections of counts (no prefix sums: they would cost a tile of shared
    memory): the n_top-th largest key t bit by bit from the sign down, then among the keys equal
    to t the page bound that admits just enough of them."""
    ans = tl.where(_count(s >= 0) >= n_top, 0, INT_MIN)
    for i in range(31):
        trial = ans | (tl.full([], 1, tl.int32) << (30 - i))
        ans = tl.where(_count(s >= trial) >= n_top, trial, ans)
    gt = s > ans
    eq = s == ans
    need = n_top - _count(gt)
    # Smallest b with count(eq & idx < b) >= need: the pages of eq below b are the ones to take.
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], MAX_ROW_C, tl.int32)
    for _ in range(17):
        mid = (lo + hi) // 2
        enough = _count(eq & (idx < mid)) >= need
        hi = tl.where(enough, mid, hi)
        lo = tl.where(enough, lo, mid + 1)
    return gt | (eq & (idx < hi))


@jit
def _topk_select_kernel(
    scores, bounds, page_table, sel_slots, sel_lens, top_idx, scratch,
    n_cols, stride_s, stride_t, stride_sel, stride_top,
    K: tl.constexpr, ASSEMBLE: tl.constexpr, KMAX: tl.constexpr, BLOCK_K: tl.constexpr, P: tl.constexpr,
    ROWS: tl.constexpr, GROUPS: tl.constexpr, CAP: tl.constexpr, SMALL: tl.constexpr,
    FORCE_BISECT: tl.constexpr,
    FOLD: tl.constexpr = False, SINK_PAGES: tl.constexpr = 0, WINDOW: tl.constexpr = 0, BUDGET: tl.constexpr = 0,
    PDL: tl.constexpr = False, timeline=None, TIMELINE: tl.constexpr = False,
):
    head = tl.program_id(0)
    if TIMELINE:
        timeline += head * 16  # 16 int64 stage times per program
    _stamp(timeline, 0, head, TIMELINE)
    pdl_wait(PDL)
    _stamp(timeline, 1, head, TIMELINE)
    row = scores + head * stride_s
    work = scratch + head * (2 * CAP)  # [pages | keys] of the compacted candidates
    if not SMALL:
        # Page of each lane of the (GROUPS, ROWS) tile: group g holds pages g, g + GROUPS, ...
        # The xor with 0 hides the contiguity from the compiler, so the load gets the one-element-
        # per-lane layout (still coalesced: lanes run along the groups) that the scatter of the
        # compaction needs anyway; otherwise each tile would be converted through shared memory.
        idx = (tl.arange(0, GROUPS)[:, None] + tl.arange(0, ROWS)[None, :] * GROUPS) ^ (n_cols >> 31)
        # The row is loaded while the plan is (no dependency): candidates are masked after.
        x = tl.load(row + idx, mask=idx < n_cols, other=0.0).to(tl.float32)
        _stamp(timeline, 2, x.to(tl.int32, bitcast=True), TIMELINE)
    if ASSEMBLE:
        # Plan of the step (same arithmetic as select.assemble_selection).
        n, n_sink, window_first, n_top = plan_bounds(bounds, FOLD, P, SINK_PAGES, WINDOW, BUDGET)
        lo = n_sink
        hi = tl.minimum(window_first, n_cols)  # candidates: pages in [lo, hi)
        n_forced = n_sink + (n + P - 1) // P - window_first
        # Forced (sink, window) and unused entries; the top entries are written below.
        store_forced(page_table, sel_slots, sel_lens, head, stride_t, stride_sel, n, n_sink, window_first,
                     n_forced, n_top, P, KMAX, BLOCK_K)
    else:
        n = 0
        lo = 0
        hi = n_cols
        n_top = K
        n_forced = 0

    if SMALL:
        # The whole row fits the ranking block: rank it directly. Non-candidates and padding get
        # the lowest key and come after every candidate (n_top never exceeds the candidates).
        c = tl.arange(0, CAP)
        cok = (c >= lo) & (c < hi)
        ckey = tl.where(cok, _keys(tl.load(row + c, mask=cok, other=0.0).to(tl.float32)), INT_MIN)
        _rank_and_store(c, ckey, cok, page_table, sel_slots, sel_lens, top_idx, head, stride_t, stride_sel,
                        stride_top, n, n_top, n_forced, P, KMAX, ASSEMBLE, timeline, TIMELINE)
    else:
        cand = (idx >= lo) & (idx < hi)
        s = tl.where(cand, _keys(x), INT_MIN)
        if FORCE_BISECT:
            take = _exact_winners(s, idx, n_top)
            per_group = tl.sum(take.to(tl.int32), axis=1)
            count = tl.sum(per_group, axis=0)
        else:
            # T = n_top-th largest of the strided group maxima (INT_MAX when n_top = 0): every
            # winner reaches it; usually few others do.
            gmax = tl.max(s, axis=1)
            g_ahead = gmax[None, :] > gmax[:, None]
            n_ahead = tl.sum(g_ahead.to(tl.int32), axis=1)
            thresh = tl.min(tl.where(n_ahead < n_top, gmax, INT_MAX), axis=0)
            _stamp(timeline, 3, thresh, TIMELINE)
            take = s >= thresh
            per_group = tl.sum(take.to(tl.int32), axis=1)
            count = tl.sum(per_group, axis=0)
            if count > CAP:  # many ties at T, adversarial rows: the exact winners instead
                take = _exact_winners(s, idx, n_top)
                per_group = tl.sum(take.to(tl.int32), axis=1)
                count = tl.sum(per_group, axis=0)
            _stamp(timeline, 4, count, TIMELINE)
        # Compact the kept pages (<= CAP) into the scratch row: slot = kept pages in the groups
        # before mine + kept pages before mine in my group (prefix sums of the group counts and
        # along the group: no atomics, no row-sized scan).
        t32 = take.to(tl.int32)
        slot = (tl.cumsum(per_group, axis=0) - per_group)[:, None] + (tl.cumsum(t32, axis=1) - t32)
        _stamp(timeline, 5, slot, TIMELINE)
        take = take & (slot < CAP)  # always true (at most CAP are kept)
        tl.store(work + slot, idx, mask=take)
        tl.store(work + CAP + slot, s, mask=take)
        tl.debug_barrier()  # the scratch row is written and read by different threads
        if count <= CAP // 2:  # usual: rank in a block of half the size (a quarter of the pairs)
            _rank_compacted(work, count, CAP // 2, CAP, page_table, sel_slots, sel_lens, top_idx, head, stride_t,
                            stride_sel, stride_top, n, n_top, n_forced, P, KMAX, ASSEMBLE, timeline, TIMELINE)
        else:
            _rank_compacted(work, count, CAP, CAP, page_table, sel_slots, sel_lens, top_idx, head, stride_t,
                            stride_sel, stride_top, n, n_top, n_forced, P, KMAX, ASSEMBLE, timeline, TIMELINE)


@jit
def _rank_compacted(work, count, R: tl.constexpr, CAP: tl.constexpr, page_table, sel_slots, sel_lens, top_idx, head,
                    stride_t, stride_sel, stride_top, n, n_top, n_forced, P: tl.constexpr, KMAX: tl.constexpr,
                    ASSEMBLE: tl.constexpr, timeline, TIMELINE: tl.constexpr):
    """The first R entries of the scratch row ([pages | keys], ``count`` <= R of them used) ranked."""
    c = tl.arange(0, R)
    cok = c < count
    cpage = tl.load(work + c, mask=cok, other=0)
    ckey = tl.where(cok, tl.load(work + CAP + c, mask=cok, other=0), INT_MIN)
    cpage = tl.where(cok, cpage, INT_MAX - R + c)  # empty slots: last, distinct
    _stamp(timeline, 6, ckey + cpage, TIMELINE)
    _rank_and_store(cpage, ckey, cok, page_table, sel_slots, sel_lens, top_idx, head, stride_t, stride_sel,
                    stride_top, n, n_top, n_forced, P, KMAX, ASSEMBLE, timeline, TIMELINE)


@jit
def _rank_and_store(cpage, ckey, cok, page_table, sel_slots, sel_lens, top_idx, head, stride_t, stride_sel,
                    stride_top, n, n_top, n_forced, P: tl.constexpr, KMAX: tl.constexpr, ASSEMBLE: tl.constexpr,
                    timeline, TIMELINE: tl.constexpr):
    """Winners among candidates (page, key; cok: real) by rank, written as the top entries."""
    if ASSEMBLE:  # issued before the ranking, so its latency hides behind it
        cslot = tl.load(page_table + head * stride_t + cpage, mask=cok, other=0)
    # Rank = candidates ahead in the order (key desc, page asc): winners are ranks < n_top, and
    # rank is their position among the top entries (sorted by falling score, like torch.topk).
    ahead = (ckey[None, :] > ckey[:, None]) | ((ckey[None, :] == ckey[:, None]) & (cpage[None, :] < cpage[:, None]))
    rank = tl.sum(ahead.to(tl.int32), axis=1)
    _stamp(timeline, 7, rank, TIMELINE)
    win = cok & (rank < n_top)
    if ASSEMBLE:
        win = win & (n_forced + rank < KMAX)  # always true by the plan's arithmetic; never write past a row
        entry = head * stride_sel + n_forced + rank
        _stamp(timeline, 8, cslot, TIMELINE)
        tl.store(sel_slots + entry, cslot, mask=win)
        tl.store(sel_lens + entry, tl.minimum(tl.maximum(n - cpage * P, 0), P), mask=win)
    else:
        tl.store(top_idx + head * stride_top + rank, cpage, mask=win)


def _config(n_cols: int, k: int, groups: int | None, cap: int | None, num_warps: int | None):
    """Block shapes: ROWS x GROUPS covers the row; the ranking blocks are GROUPS^2 and CAP^2."""
    block = next_pow2(max(n_cols, 1))
    assert block <= MAX_ROW, f"{n_cols} pages per head: the row must fit one program ({MAX_ROW} pages)"
    wide = next_pow2(max(16, -(-3 * k // 2)))  # 1.5 k rounded up: 128 for k = 46..85
    groups = min(groups or wide, block)
    cap = cap or wide
    assert cap >= k and cap & (cap - 1) == 0, f"cap {cap} must be a power of two >= k = {k}"
    small = block <= cap
    if small:
        cap = block
    if num_warps is None:
        # One program per KV head, alone on its SM. Fastest on an H100 (`python -m perf.attention`
        # --tune, Triton 3.6): 8 warps for 1K-page rows (32K tokens), 16 for 4K, 32 for 16K, 16 for
        # 32K (both 16 and 32 spill there; 27.0 vs 27.5 us).
        num_warps = 8 if block <= 2048 else 16 if block <= 8192 else 32 if block <= 16384 else 16
    return dict(ROWS=max(1, block // groups), GROUPS=groups, CAP=cap, SMALL=small), num_warps


def _maxnreg(num_warps: int) -> int:
    """All the registers one program may have alone on an SM: ptxas otherwise settles for half
    at 16-32 warps and spills the row (seen with Triton 3.6 for 32K-page rows)."""
    return min(255, 65536 // (32 * num_warps))


def topk_indices(scores: torch.Tensor, k: int, groups: int | None = None, cap: int | None = None,
                 num_warps: int | None = None, method: str = "filter") -> torch.Tensor:
    """Indices (rows, k) int32 of the k largest entries of each row of ``scores`` (rows, n) fp32
    (fp16/bf16 upcast; no NaN), exact, ties to the smaller index. Sorted by falling value on the
    fast path; in index order when the fallback runs (many ties). 0 <= k <= n."""
    assert scores.dim() == 2 and scores.stride(1) == 1
    assert scores.dtype in (torch.float32, torch.float16, torch.bfloat16)
    rows, n_cols = scores.shape
    assert 0 <= k <= n_cols, f"k = {k} for rows of {n_cols}"
    assert method in METHODS
    top = torch.empty((rows, k), device=scores.device, dtype=torch.int32)
    if k == 0 or rows == 0:
        return top
    cfg, num_warps = _config(n_cols, k, groups, cap, num_warps)
    scratch = torch.empty((rows, 2 * cfg["CAP"]), device=scores.device, dtype=torch.int32)
    pdl = pdl_enabled(scores.device)
    _topk_select_kernel[(rows,)](
        scores, top, top, top, top, top, scratch,
        n_cols, scores.stride(0), 0, 0, top.stride(0),
        K=k, ASSEMBLE=False, KMAX=k, BLOCK_K=next_pow2(k), P=1, FORCE_BISECT=method == "bisect",
        num_warps=num_warps, maxnreg=_maxnreg(num_warps), **cfg, PDL=pdl, **pdl_launch(pdl),
    )
    return top


def select_top_pages(scores: torch.Tensor, page_table: torch.Tensor, plan: SelectionPlan, masked: bool = False,
                     groups: int | None = None, cap: int | None = None, num_warps: int | None = None,
                     method: str = "filter", timeline: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch for select.select_with_plan: scores (Hkv, max_pages) fp32, page_table
    (Hkv, max_pages) int32 -> sel_slots, sel_lens (Hkv, Kmax) int32, [sinks | window | top (by
    falling score) | unused]. Only pages in [bounds[1], bounds[2]) compete, whatever the scores of
    the others (``masked`` is accepted for the torch path's signature). Rows longer than MAX_ROW
    pages take the torch path. ``timeline``: diagnostics, (Hkv, 16) int64 on the GPU: per program,
    %globaltimer at the kernel's stages (start, after the PDL wait, row loaded, threshold, kept
    pages counted, compaction, scratch read back, ranked, page table read)."""
    hkv, max_pages = scores.shape
    if max_pages > MAX_ROW:
        from lcrun.kernels.select import select_top_pages as torch_path
        return torch_path(scores, page_table, plan, masked)
    assert scores.dtype == torch.float32 and scores.stride(1) == 1
    assert page_table.shape == (hkv, max_pages) and page_table.dtype == torch.int32 and page_table.stride(1) == 1
    plan_ptr, plan_kw = plan_kernel_args(plan)  # bounds, or seq_len of a folded plan
    assert plan_ptr.dtype == torch.int32 and plan_ptr.device == scores.device
    assert method in METHODS
    sel_slots = torch.empty((hkv, plan.kmax), device=scores.device, dtype=torch.int32)
    sel_lens = torch.empty_like(sel_slots)
    cfg, num_warps = _config(max_pages, plan.top_k, groups, cap, num_warps)
    scratch = torch.empty((hkv, 2 * cfg["CAP"]), device=scores.device, dtype=torch.int32)
    pdl = pdl_enabled(scores.device)
    _topk_select_kernel[(hkv,)](
        scores, plan_ptr, page_table, sel_slots, sel_lens, sel_slots, scratch,
        max_pages, scores.stride(0), page_table.stride(0), sel_slots.stride(0), 0,
        K=plan.top_k, ASSEMBLE=True, KMAX=plan.kmax, BLOCK_K=next_pow2(plan.kmax), P=plan.page_size,
        FORCE_BISECT=method == "bisect", num_warps=num_warps, maxnreg=_maxnreg(num_warps), **cfg, **plan_kw,
        PDL=pdl, **pdl_launch(pdl), **_timeline_args(timeline, hkv),
    )
    return sel_slots, sel_lens


def _timeline_args(timeline: torch.Tensor | None, programs: int) -> dict:
    if timeline is None:
        return {}
    assert timeline.shape == (programs, 16) and timeline.dtype == torch.int64 and timeline.is_contiguous()
    return dict(timeline=timeline, TIMELINE=True)
