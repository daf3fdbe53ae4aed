"""Hierarchical page selection: chunk abstracts first, then pages inside the best chunks.

Flat selection reads every page abstract each step: 1/P of the KV bytes (128 MB per layer at 1M
tokens, P = 32, 8 KV heads, d = 128, bf16), which alone caps its speedup over dense decoding. Here a
chunk abstract (per-channel min/max over the page abstracts of CP consecutive full pages, per KV
head) is kept beside the page abstracts; a decode step

1. scores the chunks (score.score_pages on the chunk abstracts, ``row_pages=CP``: chunks holding a
   candidate page), reading 1/CP of the page-abstract bytes. A chunk's score is an upper bound of
   the scores of its pages (its min/max envelope contains theirs);
2. ``_hier_pages_kernel``: program (j, h) takes head h's j-th best chunk (j < top_chunks; order:
   score desc, chunk asc) among the group leaders: chunk c is in group c % LEADER_GROUPS and only
   the best chunk of a group competes, so with more chunks than groups (> 128 chunks: 128K tokens at
   P = CP = 32) two top chunks of one group keep only the better one. No sort: one reduction and a
   rank by comparison. It scores the chunk's CP pages from their page abstracts (CUDA cores, the
   same bound as score_pages), writing (score, page) as one sortable int64 key per page;
3. ``_hier_select_kernel``: one program per KV head keeps the top pages of the top_chunks * CP keys
   (threshold from strided group maxima, compaction, rank by comparison, as topk.py; a sort only
   for adversarial rows) and writes sel_slots/sel_lens [sinks | window | top (by falling score,
   ties to the smaller page) | unused] like topk.select_top_pages. Only candidate pages (full,
   neither sink nor window) compete.

When top_chunks covers every candidate chunk (and there are at most 128 chunks) the result is the
flat selection exactly. Otherwise it is an approximation: pages outside the top chunks are never
looked at. (First version: full bitonic sorts (tl.sort) of the chunk row and of the candidates:
~15-20 us per 1024 keys on an H100, measured; replaced.) Fewer candidates than
top pages (short contexts, chunks shared with the sinks/window) leave the last top entries unused.

Storage: cmin/cmax (Hkv, max_chunks, D), max_chunks = ceil(max_pages / CP), kmin's dtype; a chunk
summarises its pages below num_full_pages (update_chunk_abstracts refreshes the chunks holding given
pages; a chunk with no full page holds +inf/-inf and never competes). Everything reads the plan from
the device (or computes it from seq_len: a folded plan), so the step replays in a CUDA graph.
Plain-torch versions: reference.update_chunk_abstracts, reference.select_top_pages_hier.
"""
from __future__ import annotations

import torch

from lcrun.kernels.select import SelectionPlan
from lcrun.kernels.select_kernels import plan_bounds, plan_kernel_args, quest_bound, store_forced
from lcrun.kernels.triton_support import jit, next_pow2, pdl_enabled, pdl_launch, pdl_wait, tl

INT64_MIN = tl.constexpr(-9223372036854775808)
FINITE = tl.constexpr(3.0e38)
MAX_CHUNKS = 1 << 13  # chunks per KV head sorted in one program (8M tokens at P = 32, CP = 32)
TOP_CHUNKS = 32       # default: chunks whose pages compete (1024 pages at CP = 32)
CHUNK_PAGES = 32      # default pages per chunk
LEADER_GROUPS = 128   # chunk groups whose leaders compete (exact top chunks up to this many chunks)


# auto mode: hierarchical from 8192 pages per KV head (256K tokens at P = 32). Per layer inside a
# decode graph on an H200 (attention-h200-2026-11-29-layer-32k-1m.json): flat is faster at 128K
# (20-21 us against 24-25 for 32x32) and slower at 512K (39-41 against 25-26); 256K lies between, unmeasured.
AUTO_MIN_PAGES = 8192


def auto_chunk_pages(max_pages: int, chunk_pages: int = CHUNK_PAGES) -> int:
    """The paged cache's ``chunk_pages="auto"``: hierarchical selection (chunk_pages) for caches of
    at least AUTO_MIN_PAGES pages per KV head, flat (0) below."""
    return chunk_pages if max_pages >= AUTO_MIN_PAGES else 0


# -- chunk abstracts -------------------------------------------------------------------------------

@jit
def _update_chunk_abstracts_kernel(
    kmin, kmax, cmin, cmax, pages, num_full_pages, max_pages,
    stride_abs_h, stride_abs_p, stride_c_h, stride_c_p,
    CP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    head = tl.program_id(1)
    chunk = tl.load(pages + i) // CP
    offs_p = chunk * CP + tl.arange(0, CP)
    offs_d = tl.arange(0, BLOCK_D)
    full = (offs_p < tl.load(num_full_pages)) & (offs_p < max_pages)
    mask = full[:, None] & (offs_d < D)[None, :]
    src = head * stride_abs_h + offs_p.to(tl.int64)[:, None] * stride_abs_p + offs_d[None, :]
    low = tl.min(tl.where(mask, tl.load(kmin + src, mask=mask, other=0.0).to(tl.float32), float("inf")), axis=0)
    high = tl.max(tl.where(mask, tl.load(kmax + src, mask=mask, other=0.0).to(tl.float32), float("-inf")), axis=0)
    dst = head * stride_c_h + chunk.to(tl.int64) * stride_c_p + offs_d
    tl.store(cmin + dst, low.to(cmin.dtype.element_ty), mask=offs_d < D)
    tl.store(cmax + dst, high.to(cmax.dtype.element_ty), mask=offs_d < D)


def update_chunk_abstracts(kmin: torch.Tensor, kmax: torch.Tensor, cmin: torch.Tensor, cmax: torch.Tensor,
                           pages: torch.Tensor, num_full_pages: torch.Tensor, chunk_pages: int) -> None:
    """cmin/cmax[h, c] = per-channel min/max of kmin/kmax[h, p] over the pages p < num_full_pages of
    chunk c (pages c * CP .. c * CP + CP - 1), for each chunk c holding a page of ``pages``
    (+inf/-inf for a chunk with no full page).

    kmin, kmax: (Hkv, max_pages, D), last dim contiguous; cmin, cmax: (Hkv, ceil(max_pages / CP), D),
    kmin's dtype, last dim contiguous; pages: (n,) int32 (repeats allowed: the same values are
    written); num_full_pages: 1-element int32; all on one device. chunk_pages: a power of two."""
    _check_chunks(kmin, kmax, cmin, cmax, chunk_pages)
    assert pages.dim() == 1 and pages.dtype == torch.int32 and pages.is_contiguous()
    assert num_full_pages.numel() == 1 and num_full_pages.dtype == torch.int32
    assert len({kmin.device, cmin.device, pages.device, num_full_pages.device}) == 1
    n = pages.numel()
    if n == 0:
        return
    hkv, max_pages, d = kmin.shape
    _update_chunk_abstracts_kernel[(n, hkv)](
        kmin, kmax, cmin, cmax, pages, num_full_pages, max_pages,
        kmin.stride(0), kmin.stride(1), cmin.stride(0), cmin.stride(1),
        CP=chunk_pages, D=d, BLOCK_D=next_pow2(d), num_warps=4,
    )


def chunk_abstracts_like(kmin: torch.Tensor, chunk_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty cmin/cmax (+inf/-inf: no full page yet) for page abstracts shaped like ``kmin``
    ((..., Hkv, max_pages, D); leading layer dims allowed)."""
    *lead, max_pages, d = kmin.shape
    shape = (*lead, -(-max_pages // chunk_pages), d)
    return (torch.full(shape, float("inf"), device=kmin.device, dtype=kmin.dtype),
            torch.full(shape, float("-inf"), device=kmin.device, dtype=kmin.dtype))


def _check_chunks(kmin, kmax, cmin, cmax, chunk_pages) -> None:
    assert chunk_pages >= 1 and chunk_pages & (chunk_pages - 1) == 0, f"chunk_pages {chunk_pages}: a power of two"
    hkv, max_pages, d = kmin.shape
    shape = (hkv, -(-max_pages // chunk_pages), d)
    assert kmax.shape == kmin.shape and kmin.stride() == kmax.stride() and kmin.stride(2) == 1
    assert cmin.shape == shape and cmax.shape == shape, f"chunk abstracts {tuple(cmin.shape)} != {shape}"
    assert cmin.stride() == cmax.stride() and cmin.stride(2) == 1
    assert cmin.dtype == cmax.dtype == kmin.dtype == kmax.dtype


# -- hierarchical selection ------------------------------------------------------------------------

@jit
def _order_keys(x, idx):
    """(fp32 score, int32 index) -> int64 key: larger score first, then smaller index."""
    b = x.to(tl.int32, bitcast=True)
    b = b ^ ((b >> 31) & 0x7FFFFFFF)  # order-preserving int32
    return (b.to(tl.int64) << 32) | (0x7FFFFFFF - idx).to(tl.int64)


@jit
def _hier_pages_kernel(
    q, kmin, kmax, chunk_scores, plan, num_full_pages, cand, n_chunks,
    stride_q_h, stride_abs_h, stride_abs_p, stride_cs_h, stride_cand_h,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, CP: tl.constexpr, CHUNKS_PAD: tl.constexpr,
    GROUPS: tl.constexpr, REDUCE_MAX: tl.constexpr, P: tl.constexpr, FOLD: tl.constexpr, SINK_PAGES: tl.constexpr,
    WINDOW: tl.constexpr, BUDGET: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    j = tl.program_id(0)
    head = tl.program_id(1)
    _n, n_sink, window_first, _top = plan_bounds(plan, FOLD, P, SINK_PAGES, WINDOW, BUDGET)
    lo = n_sink
    hi = tl.minimum(tl.load(num_full_pages), window_first)  # candidate pages [lo, hi)
    # Chunks holding a candidate page, as order keys. Chunk c belongs to group c % GROUPS and the
    # best chunk of each group (its leader) competes: program j takes the leader ranked j (rank =
    # leaders ahead; keys are distinct). No sort: one reduction and a GROUPS x GROUPS comparison.
    # With GROUPS >= chunks (every context up to GROUPS * CP pages) these are the top chunks.
    offs_c = tl.arange(0, CHUNKS_PAD)
    c_ok = tl.where(hi > lo, (offs_c >= lo // CP) & (offs_c * CP < hi) & (offs_c < n_chunks), False)
    cs = tl.load(chunk_scores + head * stride_cs_h + offs_c, mask=c_ok, other=0.0)
    ckey = tl.where(c_ok, _order_keys(cs, offs_c), INT64_MIN)
    lead = tl.max(tl.reshape(ckey, (CHUNKS_PAD // GROUPS, GROUPS)), axis=0)
    rank = tl.sum((lead[None, :] > lead[:, None]).to(tl.int32), axis=1)
    pick = tl.max(tl.where(rank == j, lead, INT64_MIN), axis=0)
    chunk = tl.where(pick != INT64_MIN, 0x7FFFFFFF - (pick & 0x7FFFFFFF).to(tl.int32), 0)
    offs_p = chunk * CP + tl.arange(0, CP)
    valid = tl.where(pick != INT64_MIN, (offs_p >= lo) & (offs_p < hi), False)
    offs_d = tl.arange(0, BLOCK_D)
    mask = valid[:, None] & (offs_d < D)[None, :]
    src = head * stride_abs_h + offs_p.to(tl.int64)[:, None] * stride_abs_p + offs_d[None, :]
    low = tl.load(kmin + src, mask=mask, other=0.0).to(tl.float32)
    high = tl.load(kmax + src, mask=mask, other=0.0).to(tl.float32)
    acc = quest_bound(q, low, high, head, stride_q_h, offs_d, D, G, REDUCE_MAX, CP)
    acc = tl.minimum(tl.maximum(tl.where(acc == acc, acc, -FINITE), -FINITE), FINITE)
    pkey = tl.where(valid, _order_keys(acc, offs_p), INT64_MIN)
    tl.store(cand + head * stride_cand_h + j * CP + tl.arange(0, CP), pkey)


@jit
def _hier_select_kernel(
    cand, plan, page_table, sel_slots, sel_lens, scratch,
    stride_cand_h, stride_t, stride_sel,
    N_CAND: tl.constexpr, KMAX: tl.constexpr, BLOCK_K: tl.constexpr, P: tl.constexpr, TG: tl.constexpr,
    CAP: tl.constexpr,
    FOLD: tl.constexpr, SINK_PAGES: tl.constexpr, WINDOW: tl.constexpr, BUDGET: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    head = tl.program_id(0)
    n, n_sink, window_first, n_top = plan_bounds(plan, FOLD, P, SINK_PAGES, WINDOW, BUDGET)
    offs = tl.arange(0, N_CAND)
    key = tl.load(cand + head * stride_cand_h + offs)
    valid = key != INT64_MIN
    n_forced = n_sink + (n + P - 1) // P - window_first
    n_win = tl.minimum(tl.minimum(n_top, tl.sum(valid.to(tl.int32), axis=0)), KMAX - n_forced)
    # Threshold: the n_win-th largest of TG strided group maxima is <= the n_win-th largest key, so
    # every winner passes; usually few others do (as in topk.py). Keys are distinct.
    gmax = tl.max(tl.reshape(key, (N_CAND // TG, TG)), axis=0)
    g_rank = tl.sum((gmax[None, :] > gmax[:, None]).to(tl.int32), axis=1)
    thresh = tl.min(tl.where(g_rank < n_win, gmax, 9223372036854775807), axis=0)
    take = valid & (key >= thresh)
    if tl.sum(take.to(tl.int32), axis=0) > CAP:  # adversarial rows: the exact n_win-th key by a sort
        srt = tl.sort(key, descending=True)
        kth = tl.max(tl.where(offs == n_win - 1, srt, INT64_MIN), axis=0)
        take = tl.where(n_win > 0, valid & (key >= kth), False)
    # Compact the kept keys (<= CAP) into the scratch row (positions by a prefix count), then rank
    # them by a CAP x CAP comparison: rank = keys ahead = entry among the top pages.
    pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    work = scratch + head * CAP
    tl.store(work + pos, key, mask=take)
    tl.debug_barrier()  # the scratch row is written and read by different threads
    count = tl.sum(take.to(tl.int32), axis=0)
    if count <= CAP // 2:  # usual: rank in a block of half the size (a quarter of the pairs)
        _rank_kept(work, count, CAP // 2, n_win, page_table, sel_slots, sel_lens, head, stride_t, stride_sel, n,
                   n_forced, P)
    else:
        _rank_kept(work, count, CAP, n_win, page_table, sel_slots, sel_lens, head, stride_t, stride_sel, n,
                   n_forced, P)
    # Forced (sink, window) and unused entries (same arithmetic as select.assemble_selection).
    store_forced(page_table, sel_slots, sel_lens, head, stride_t, stride_sel, n, n_sink, window_first,
                 n_forced, n_win, P, KMAX, BLOCK_K)


@jit
def _rank_kept(work, count, R: tl.constexpr, n_win, page_table, sel_slots, sel_lens, head, stride_t, stride_sel, n,
               n_forced, P: tl.constexpr):
    """Rank the first ``count`` (<= R) keys of the scratch row; the n_win best become top entries."""
    c = tl.arange(0, R)
    ck = tl.load(work + c, mask=c < count, other=INT64_MIN)
    rank = tl.sum((ck[None, :] > ck[:, None]).to(tl.int32), axis=1)
    win = (ck != INT64_MIN) & (rank < n_win)
    page = tl.where(win, 0x7FFFFFFF - (ck & 0x7FFFFFFF).to(tl.int32), 0)
    slot = tl.load(page_table + head * stride_t + page, mask=win, other=0)
    entry = head * stride_sel + n_forced + rank
    tl.store(sel_slots + entry, slot, mask=win)
    tl.store(sel_lens + entry, tl.minimum(tl.maximum(n - page * P, 0), P), mask=win)


def select_top_pages_hier(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, cmin: torch.Tensor,
                          cmax: torch.Tensor, num_full_pages: torch.Tensor, page_table: torch.Tensor,
                          plan: SelectionPlan, chunk_pages: int, top_chunks: int = TOP_CHUNKS,
                          group_reduce: str = "max", score_kw: dict | None = None,
                          hier_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hierarchical score + top-k + assembly (see the module docstring): three launches.

    q: (Hq, D), last dim contiguous, Hq = G * Hkv; kmin/kmax: (Hkv, max_pages, D) page abstracts;
    cmin/cmax: (Hkv, ceil(max_pages / chunk_pages), D) chunk abstracts (update_chunk_abstracts);
    num_full_pages: 1-element int32; page_table: (Hkv, max_pages) int32; plan: the step's
    SelectionPlan (bounds on the device, or folded). top_chunks: chunks whose pages compete (a
    power of two; rounded down to the padded chunk count). score_kw: tuning arguments of
    score_pages for the chunk scores. Returns sel_slots, sel_lens (Hkv, Kmax) int32.
    """
    from lcrun.kernels.score import score_pages
    _check_chunks(kmin, kmax, cmin, cmax, chunk_pages)
    hkv, max_pages, d = kmin.shape
    hq = q.shape[0]
    assert q.dim() == 2 and q.stride(1) == 1 and q.shape[1] == d and hq % hkv == 0
    assert page_table.shape == (hkv, max_pages) and page_table.dtype == torch.int32 and page_table.stride(1) == 1
    assert num_full_pages.numel() == 1 and num_full_pages.dtype == torch.int32
    assert group_reduce in ("max", "sum")
    assert top_chunks >= 1 and top_chunks & (top_chunks - 1) == 0, "top_chunks must be a power of two"
    n_chunks = cmin.shape[1]
    chunks_pad = next_pow2(n_chunks)
    assert chunks_pad <= MAX_CHUNKS, f"{n_chunks} chunks per KV head: raise chunk_pages (at most {MAX_CHUNKS})"
    top_chunks = min(top_chunks, chunks_pad)
    chunk_scores = score_pages(q, cmin, cmax, num_full_pages, group_reduce, candidates=plan,
                               row_pages=chunk_pages, **(score_kw or {}))
    n_cand = top_chunks * chunk_pages
    cand = torch.empty((hkv, n_cand), device=q.device, dtype=torch.int64)
    plan_ptr, plan_kw = plan_kernel_args(plan)
    pdl = pdl_enabled(q.device)
    _hier_pages_kernel[(top_chunks, hkv)](
        q, kmin, kmax, chunk_scores, plan_ptr, num_full_pages, cand, n_chunks,
        q.stride(0), kmin.stride(0), kmin.stride(1), chunk_scores.stride(0), cand.stride(0),
        G=hq // hkv, D=d, BLOCK_D=next_pow2(d), CP=chunk_pages, CHUNKS_PAD=chunks_pad,
        GROUPS=min(chunks_pad, LEADER_GROUPS),
        REDUCE_MAX=group_reduce == "max", P=plan.page_size, num_warps=hier_warps or 8, **plan_kw,
        PDL=pdl, **pdl_launch(pdl),
    )
    sel_slots = torch.empty((hkv, plan.kmax), device=q.device, dtype=torch.int32)
    sel_lens = torch.empty_like(sel_slots)
    cap = max(128, next_pow2(plan.kmax))
    scratch = torch.empty((hkv, cap), device=q.device, dtype=torch.int64)
    _hier_select_kernel[(hkv,)](
        cand, plan_ptr, page_table, sel_slots, sel_lens, scratch,
        cand.stride(0), page_table.stride(0), sel_slots.stride(0),
        N_CAND=n_cand, KMAX=plan.kmax, BLOCK_K=next_pow2(plan.kmax), P=plan.page_size,
        TG=min(n_cand, 128), CAP=cap, num_warps=8 if cap <= 128 else 16, **plan_kw,
        PDL=pdl, **pdl_launch(pdl),
    )
    return sel_slots, sel_lens
