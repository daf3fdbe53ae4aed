"""Quest page scores: an upper bound of q.k over a page's keys, from the page's min/max abstract."""
from __future__ import annotations

import torch

from lcrun.kernels.select import SelectionPlan
from lcrun.kernels.select_kernels import plan_bounds, plan_kernel_args, quest_bound
from lcrun.kernels.triton_support import (dot_precision, dot_upcast, jit, launch_fitting_shared_memory, next_pow2, pdl_enabled, pdl_launch, pdl_wait,
                                          tl, triton)

GROUP_REDUCES = ("max", "sum")
FINITE = tl.constexpr(3.0e38)  # clamp for scored pages: they must rank above -inf


@jit
def _row_range(num_full_pages, candidates, HAS_CANDIDATES: tl.constexpr, FOLD: tl.constexpr, P: tl.constexpr,
               SINK_PAGES: tl.constexpr, WINDOW: tl.constexpr, BUDGET: tl.constexpr, ROW_PAGES: tl.constexpr):
    """Rows [lo, hi) to score: full pages, within the selection's candidates [sink pages, first
    window page) if given; rows of ROW_PAGES pages (chunk abstracts): the rows holding such a page."""
    lo = tl.zeros([], tl.int32)
    hi = tl.load(num_full_pages)
    if HAS_CANDIDATES:  # selection bounds: only pages in [bounds[1], bounds[2]) compete
        _n, n_sink, window_first, _top = plan_bounds(candidates, FOLD, P, SINK_PAGES, WINDOW, BUDGET)
        lo = n_sink
        hi = tl.minimum(hi, window_first)
    if ROW_PAGES > 1:
        hi = tl.maximum(hi, lo)
        lo_row = lo // ROW_PAGES
        hi = tl.where(hi > lo, (hi + ROW_PAGES - 1) // ROW_PAGES, lo_row)
        lo = lo_row
    return lo, hi


@jit
def _score_pages_kernel(
    q, kmin, kmax, num_full_pages, candidates, scores, max_pages,
    stride_q_h, stride_abs_h, stride_abs_p, stride_scores_h,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_PAGES: tl.constexpr,
    REDUCE_MAX: tl.constexpr, HAS_CANDIDATES: tl.constexpr,
    FOLD: tl.constexpr, P: tl.constexpr, SINK_PAGES: tl.constexpr, WINDOW: tl.constexpr, BUDGET: tl.constexpr,
    ROW_PAGES: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    block = tl.program_id(0)
    head = tl.program_id(1)
    offs_p = block * BLOCK_PAGES + tl.arange(0, BLOCK_PAGES)
    offs_d = tl.arange(0, BLOCK_D)
    lo, hi = _row_range(num_full_pages, candidates, HAS_CANDIDATES, FOLD, P, SINK_PAGES, WINDOW, BUDGET, ROW_PAGES)
    out = scores + head * stride_scores_h + offs_p
    if (block * BLOCK_PAGES >= hi) | ((block + 1) * BLOCK_PAGES <= lo):
        # Capacity-sized grid: blocks with no page to score only write -inf, reading nothing.
        tl.store(out, tl.full([BLOCK_PAGES], float("-inf"), tl.float32), mask=offs_p < max_pages)
    else:
        valid = (offs_p >= lo) & (offs_p < hi)
        mask = valid[:, None] & (offs_d < D)[None, :]
        src = head * stride_abs_h + offs_p.to(tl.int64)[:, None] * stride_abs_p + offs_d[None, :]
        low = tl.load(kmin + src, mask=mask, other=0.0).to(tl.float32)
        high = tl.load(kmax + src, mask=mask, other=0.0).to(tl.float32)
        acc = quest_bound(q, low, high, head, stride_q_h, offs_d, D, G, REDUCE_MAX, BLOCK_PAGES)
        # Finite scores (nan -> lowest) always rank above the -inf of pages that do not compete.
        acc = tl.minimum(tl.maximum(tl.where(acc == acc, acc, -FINITE), -FINITE), FINITE)
        tl.store(out, tl.where(valid, acc, float("-inf")), mask=offs_p < max_pages)


@jit
def _score_pages_mma_kernel(
    q, kmin, kmax, num_full_pages, candidates, scores, max_pages,
    stride_q_h, stride_abs_h, stride_abs_p, stride_scores_h,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_PAGES: tl.constexpr,
    REDUCE_MAX: tl.constexpr, HAS_CANDIDATES: tl.constexpr, NUM_STAGES: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    FOLD: tl.constexpr, P: tl.constexpr, SINK_PAGES: tl.constexpr, WINDOW: tl.constexpr, BUDGET: tl.constexpr,
    ROW_PAGES: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Same scores on the tensor cores. Since kmax >= kmin, max(q * kmin, q * kmax) is q * kmax
    where q > 0 and q * kmin where q < 0, so the bound of the G query heads over a block of pages
    is two matrix products, relu(Q) @ kmax^T + min(Q, 0) @ kmin^T ((G, D) x (D, pages), fp32
    accumulation; bf16 x bf16 products are exact in fp32). No arithmetic left to hide: the loop
    over blocks p, p + programs, ... is software-pipelined (async copies NUM_STAGES deep), so each
    program keeps several blocks of abstracts in flight."""
    pdl_wait(PDL)
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    head = tl.program_id(1)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    arange_p = tl.arange(0, BLOCK_PAGES)
    qt = tl.load(q + (head * G + offs_g)[:, None] * stride_q_h + offs_d[None, :],
                 mask=(offs_g < G)[:, None] & (offs_d < D)[None, :], other=0.0)
    if DOT_FP32:
        qt = qt.to(tl.float32)
    zero = tl.zeros_like(qt)
    q_pos = tl.where(qt > 0, qt, zero)
    q_neg = tl.where(qt < 0, qt, zero)
    lo, hi = _row_range(num_full_pages, candidates, HAS_CANDIDATES, FOLD, P, SINK_PAGES, WINDOW, BUDGET, ROW_PAGES)
    num_blocks = tl.cdiv(max_pages, BLOCK_PAGES)
    first = tl.minimum(lo // BLOCK_PAGES, num_blocks)
    last = tl.maximum(tl.minimum(tl.cdiv(hi, BLOCK_PAGES), num_blocks), first)
    out = scores + head * stride_scores_h
    row_ok = (offs_g < G)[:, None]
    for blk in tl.range(first + pid, last, programs, num_stages=NUM_STAGES):
        offs_p = blk * BLOCK_PAGES + arange_p
        valid = (offs_p >= lo) & (offs_p < hi)
        # (D, pages) tiles: the abstracts of a page are contiguous along D.
        src = head * stride_abs_h + offs_p.to(tl.int64)[None, :] * stride_abs_p + offs_d[:, None]
        mask = valid[None, :] & (offs_d < D)[:, None]
        low = tl.load(kmin + src, mask=mask, other=0.0)
        high = tl.load(kmax + src, mask=mask, other=0.0)
        if DOT_FP32:
            low = low.to(tl.float32)
            high = high.to(tl.float32)
        bound = tl.dot(q_pos, high, input_precision=PRECISION)
        bound = tl.dot(q_neg, low, bound, input_precision=PRECISION)  # (G_PAD, BLOCK_PAGES)
        if REDUCE_MAX:
            acc = tl.max(tl.where(row_ok, bound, float("-inf")), axis=0)
        else:
            acc = tl.sum(tl.where(row_ok, bound, 0.0), axis=0)
        acc = tl.minimum(tl.maximum(tl.where(acc == acc, acc, -FINITE), -FINITE), FINITE)
        tl.store(out + offs_p, tl.where(valid, acc, float("-inf")), mask=offs_p < max_pages)
    minus_inf = tl.full([BLOCK_PAGES], float("-inf"), tl.float32)
    for blk in range(pid, first, programs):
        offs_p = blk * BLOCK_PAGES + arange_p
        tl.store(out + offs_p, minus_inf, mask=offs_p < max_pages)
    for blk in range(last + pid, num_blocks, programs):
        offs_p = blk * BLOCK_PAGES + arange_p
        tl.store(out + offs_p, minus_inf, mask=offs_p < max_pages)


KERNELS = ("grid", "mma")
# Which kernel score_pages runs, and its shape, by default: picked by `python -m perf.attention` --tune
# on an H100 (perf/results/attention-h100-2026-11-22-score-tuning.json, graph replay, L2 flushed):
# mma 64 pages x 4 warps, 66 programs per KV head, 3 stages: 8.8 / 14.1 / 36.8 / 60.8 us at
# 32K / 128K / 512K / 1M against 8.5 / 15.6 / 37.8 / 61.4 us for the grid kernel (32 pages, 8 warps).
# Every variant, grid or mma, pipelined or not, lands at ~2.2 TB/s at 1M (see the JSON's notes).
DEFAULT_KERNEL = "mma"
MMA_DEFAULTS = dict(block_pages=64, num_warps=4, programs_per_head=66, num_stages=3)


def score_pages(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, num_full_pages: torch.Tensor,
                group_reduce: str = "max", block_pages: int | None = None, num_warps: int | None = None,
                candidates: torch.Tensor | None = None, out: torch.Tensor | None = None,
                kernel: str | None = None, programs_per_head: int | None = None,
                num_stages: int | None = None, row_pages: int = 1) -> torch.Tensor:
    """Upper-bound attention score of each full page for one decode token.

    q: (Hq, D) post-RoPE query, Hq = G * Hkv (head i belongs to KV head i // G), last dim contiguous;
    kmin, kmax: (Hkv, max_pages, D) fp16/bf16/fp32, last dim contiguous; num_full_pages: 1-element
    int32 device tensor. Returns scores (Hkv, max_pages) fp32: for page p < num_full_pages,
    reduce_g sum_c max(q_gc * kmin_c, q_gc * kmax_c) with reduce = max or sum over the G query heads
    of the group, clamped into fp32's finite range; -inf for the other pages. Each abstract is read
    at most once. ``candidates``: optional selection bounds (SelectionPlan.bounds, (4,) int32):
    only pages in [bounds[1], bounds[2]) are scored, the rest -inf, ready for the top-k; or the
    SelectionPlan itself (a folded plan, bounds None, is computed in the kernel from seq_len).
    ``row_pages``: kmin/kmax hold chunk abstracts, one row per ``row_pages`` pages (num_full_pages
    and candidates still count pages): rows holding a scored page are scored.
    ``out``: optional preallocated (Hkv, max_pages) fp32 contiguous result.
    ``kernel``: "grid" (one program per block of pages, CUDA cores) or "mma" (tensor cores, a
    fixed number of pipelined programs per KV head: ``programs_per_head``, ``num_stages``);
    None = DEFAULT_KERNEL. Unset shape arguments take that kernel's defaults.
    """
    assert group_reduce in GROUP_REDUCES, f"group_reduce must be one of {GROUP_REDUCES}"
    assert q.dim() == 2 and q.stride(1) == 1, "q must be (Hq, D) with a contiguous last dim"
    hkv, max_pages, d = kmin.shape
    hq = q.shape[0]
    assert q.shape[1] == d and hq % hkv == 0, f"q {tuple(q.shape)} does not fit abstracts {tuple(kmin.shape)}"
    assert kmax.shape == kmin.shape and kmax.stride() == kmin.stride() and kmin.stride(2) == 1
    assert kmin.dtype == kmax.dtype and kmin.dtype in (torch.float16, torch.bfloat16, torch.float32)
    assert num_full_pages.numel() == 1 and num_full_pages.dtype == torch.int32
    assert len({q.device, kmin.device, kmax.device, num_full_pages.device}) == 1
    plan_kw = dict(FOLD=False, P=1, SINK_PAGES=0, WINDOW=0, BUDGET=0, ROW_PAGES=row_pages)
    if isinstance(candidates, SelectionPlan):
        plan_kw["P"] = candidates.page_size
        candidates, kw = plan_kernel_args(candidates)
        plan_kw.update(kw)
    if candidates is not None:
        assert candidates.dtype == torch.int32 and candidates.device == q.device
        assert candidates.shape == ((1,) if plan_kw["FOLD"] else (4,))
    assert row_pages >= 1
    block_d = next_pow2(d)
    g = hq // hkv
    kernel = kernel or DEFAULT_KERNEL
    assert kernel in KERNELS, f"kernel must be one of {KERNELS}"
    scores = _output(out, (hkv, max_pages), torch.float32, kmin.device)
    cand = candidates if candidates is not None else num_full_pages
    pdl = pdl_enabled(kmin.device)
    if kernel == "mma" and q.dtype == kmin.dtype:  # (tl.dot wants one operand type)
        block_pages = block_pages or MMA_DEFAULTS["block_pages"]
        assert block_pages >= 16 and block_pages & (block_pages - 1) == 0, "tl.dot needs >= 16 pages, a power of 2"
        programs = programs_per_head or MMA_DEFAULTS["programs_per_head"]
        programs = max(1, min(programs, triton.cdiv(max_pages, block_pages)))
        warps = num_warps or MMA_DEFAULTS["num_warps"]
        launch_fitting_shared_memory(
            ("score_mma", kmin.device, kmin.dtype, d, g, block_pages, warps), num_stages or MMA_DEFAULTS["num_stages"],
            lambda stages: _score_pages_mma_kernel[(programs, hkv)](
                q, kmin, kmax, num_full_pages, cand, scores, max_pages,
                q.stride(0), kmin.stride(0), kmin.stride(1), scores.stride(0),
                G=g, G_PAD=max(16, next_pow2(g)), D=d, BLOCK_D=block_d, BLOCK_PAGES=block_pages,
                REDUCE_MAX=group_reduce == "max", HAS_CANDIDATES=candidates is not None, NUM_STAGES=stages, **plan_kw,
                DOT_FP32=dot_upcast(kmin.dtype), PRECISION=dot_precision(kmin.dtype),
                num_warps=warps, num_stages=stages, PDL=pdl, **pdl_launch(pdl)))
        return scores
    if block_pages is None:
        # 32 pages x 128 channels (2 x 16 KiB fp32 in registers) with 8 warps measured best on an
        # H100 at 1M tokens (2.2 TB/s of a 3.0 TB/s copy); 16..64 pages were within 10 %.
        block_pages = max(16, 4096 // block_d)
    grid = (triton.cdiv(max_pages, block_pages), hkv)
    _score_pages_kernel[grid](
        q, kmin, kmax, num_full_pages, cand, scores, max_pages,
        q.stride(0), kmin.stride(0), kmin.stride(1), scores.stride(0),
        G=g, D=d, BLOCK_D=block_d, BLOCK_PAGES=block_pages,
        REDUCE_MAX=group_reduce == "max", HAS_CANDIDATES=candidates is not None, num_warps=num_warps or 8,
        **plan_kw, PDL=pdl, **pdl_launch(pdl),
    )
    return scores


def _output(out, shape, dtype, device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, device=device, dtype=dtype)
    assert out.shape == shape and out.dtype == dtype and out.device == device and out.is_contiguous()
    return out
