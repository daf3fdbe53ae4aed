"""Quest page scores: an upper bound of q.k over a page's keys, from the page's min/max abstract."""
from __future__ import annotations

import torch

from lcrun.kernels.triton_support import jit, next_pow2, tl, triton

GROUP_REDUCES = ("max", "sum")
FINITE = tl.constexpr(3.0e38)  # clamp for scored pages: they must rank above -inf


@jit
def _score_pages_kernel(
    q, kmin, kmax, num_full_pages, candidates, scores, max_pages,
    stride_q_h, stride_abs_h, stride_abs_p, stride_scores_h,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_PAGES: tl.constexpr,
    REDUCE_MAX: tl.constexpr, HAS_CANDIDATES: tl.constexpr,
):
    block = tl.program_id(0)
    head = tl.program_id(1)
    offs_p = block * BLOCK_PAGES + tl.arange(0, BLOCK_PAGES)
    offs_d = tl.arange(0, BLOCK_D)
    lo = 0
    hi = tl.load(num_full_pages)
    if HAS_CANDIDATES:  # selection bounds: only pages in [bounds[1], bounds[2]) compete
        lo = tl.load(candidates + 1)
        hi = tl.minimum(hi, tl.load(candidates + 2))
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
        if REDUCE_MAX:
            acc = tl.full([BLOCK_PAGES], float("-inf"), tl.float32)
        else:
            acc = tl.zeros([BLOCK_PAGES], tl.float32)
        # Every query head of the group reuses the abstracts already in registers.
        for g in tl.static_range(G):
            qg = tl.load(q + (head * G + g) * stride_q_h + offs_d, mask=offs_d < D, other=0.0)
            qg = qg.to(tl.float32)[None, :]
            bound = tl.sum(tl.maximum(qg * low, qg * high), axis=1)
            if REDUCE_MAX:
                acc = tl.maximum(acc, bound)
            else:
                acc = acc + bound
        # Finite scores (nan -> lowest) always rank above the -inf of pages that do not compete.
        acc = tl.minimum(tl.maximum(tl.where(acc == acc, acc, -FINITE), -FINITE), FINITE)
        tl.store(out, tl.where(valid, acc, float("-inf")), mask=offs_p < max_pages)


def score_pages(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, num_full_pages: torch.Tensor,
                group_reduce: str = "max", block_pages: int | None = None, num_warps: int = 8,
                candidates: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Upper-bound attention score of each full page for one decode token.

    q: (Hq, D) post-RoPE query, Hq = G * Hkv (head i belongs to KV head i // G), last dim contiguous;
    kmin, kmax: (Hkv, max_pages, D) fp16/bf16/fp32, last dim contiguous; num_full_pages: 1-element
    int32 device tensor. Returns scores (Hkv, max_pages) fp32: for page p < num_full_pages,
    reduce_g sum_c max(q_gc * kmin_c, q_gc * kmax_c) with reduce = max or sum over the G query heads
    of the group, clamped into fp32's finite range; -inf for the other pages. Each abstract is read
    at most once. ``candidates``: optional selection bounds (SelectionPlan.bounds, (4,) int32):
    only pages in [bounds[1], bounds[2]) are scored, the rest -inf, ready for the top-k.
    ``out``: optional preallocated (Hkv, max_pages) fp32 contiguous result.
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
    if candidates is not None:
        assert candidates.shape == (4,) and candidates.dtype == torch.int32 and candidates.device == q.device
    block_d = next_pow2(d)
    if block_pages is None:
        # 32 pages x 128 channels (2 x 16 KiB fp32 in registers) with 8 warps measured best on an
        # H100 at 1M tokens (2.2 TB/s of a 3.0 TB/s copy); 16..64 pages were within 10 %.
        block_pages = max(16, 4096 // block_d)
    scores = _output(out, (hkv, max_pages), torch.float32, kmin.device)
    grid = (triton.cdiv(max_pages, block_pages), hkv)
    _score_pages_kernel[grid](
        q, kmin, kmax, num_full_pages, candidates if candidates is not None else num_full_pages,
        scores, max_pages,
        q.stride(0), kmin.stride(0), kmin.stride(1), scores.stride(0),
        G=hq // hkv, D=d, BLOCK_D=block_d, BLOCK_PAGES=block_pages,
        REDUCE_MAX=group_reduce == "max", HAS_CANDIDATES=candidates is not None, num_warps=num_warps,
    )
    return scores


def _output(out, shape, dtype, device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, device=device, dtype=dtype)
    assert out.shape == shape and out.dtype == dtype and out.device == device and out.is_contiguous()
    return out
