"""Exact causal attention of a prefill chunk against every cached key, read through the page table
(flash-attention: one program per (query block, query head), online softmax over key blocks)."""
from __future__ import annotations

import math

import torch

from lcrun.kernels.triton_support import (LOG2E, dot_precision, dot_upcast, jit, launch_fitting_shared_memory, next_pow2,
                                          tl, triton)


@jit
def _attend_block(qt, acc, m_i, l_i, n0, q_pos, kv_end, k_pool, v_pool, table_row, offs_n, offs_d,
                  stride_slot, stride_tok,
                  P: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                  qk_scale, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    keys = n0 + offs_n
    mask_d = offs_d < D
    live = keys < kv_end
    if CAUSAL:
        slot = tl.load(table_row + keys // P, mask=live, other=0).to(tl.int64)
    else:  # the whole block lies below every query of the program: no masks
        slot = tl.load(table_row + keys // P).to(tl.int64)
    row_off = slot * stride_slot + (keys % P) * stride_tok
    if CAUSAL:
        kt = tl.load(k_pool + row_off[None, :] + offs_d[:, None], mask=live[None, :] & mask_d[:, None], other=0.0)
    else:
        kt = tl.load(k_pool + row_off[None, :] + offs_d[:, None], mask=mask_d[:, None], other=0.0)
    if DOT_FP32:
        kt = kt.to(tl.float32)
    s = tl.dot(qt, kt, input_precision=PRECISION) * qk_scale
    if CAUSAL:
        s = tl.where(live[None, :] & (keys[None, :] <= q_pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if CAUSAL:
        v = tl.load(v_pool + row_off[:, None] + offs_d[None, :], mask=live[:, None] & mask_d[None, :], other=0.0)
    else:
        v = tl.load(v_pool + row_off[:, None] + offs_d[None, :], mask=mask_d[None, :], other=0.0)
    if DOT_FP32:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@jit
def _paged_prefill_kernel(
    q, k_pool, v_pool, page_table, out, start, num_queries, qk_scale,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h, stride_slot, stride_tok, stride_table_h,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    block_m = tl.program_id(0)
    head = tl.program_id(1)
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < num_queries
    mask_d = offs_d < D
    qt = tl.load(q + offs_m[:, None] * stride_q_t + head * stride_q_h + offs_d[None, :],
                 mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if DOT_FP32:
        qt = qt.to(tl.float32)
    q_pos = start + offs_m
    table_row = page_table + (head // G) * stride_table_h

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys below the block's first query are visible to all its queries: no mask there.
    kv_end = start + tl.minimum(num_queries, (block_m + 1) * BLOCK_M)
    unmasked_end = (start + block_m * BLOCK_M) // BLOCK_N * BLOCK_N
    for n0 in range(0, unmasked_end, BLOCK_N):
        acc, m_i, l_i = _attend_block(qt, acc, m_i, l_i, n0, q_pos, kv_end, k_pool, v_pool, table_row,
                                      offs_n, offs_d, stride_slot, stride_tok, P, D, BLOCK_D, False,
                                      qk_scale, DOT_FP32, PRECISION)
    for n0 in range(unmasked_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_block(qt, acc, m_i, l_i, n0, q_pos, kv_end, k_pool, v_pool, table_row,
                                      offs_n, offs_d, stride_slot, stride_tok, P, D, BLOCK_D, True,
                                      qk_scale, DOT_FP32, PRECISION)

    res = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out + offs_m[:, None] * stride_o_t + head * stride_o_h + offs_d[None, :],
             res.to(out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def paged_prefill_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            page_table: torch.Tensor, start: int, sm_scale: float | None = None,
                            block_m: int | None = None, block_n: int | None = None,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of T queries at positions start .. start+T-1 over keys 0 .. start+T-1.

    q: (T, Hq, D) fp16/bf16/fp32, last dim contiguous; k_pool, v_pool: (num_slots, P, D) contiguous,
    q's dtype, already holding this chunk's keys (post-RoPE) and values; page_table: (Hkv, max_pages)
    int32; start: host int (prefill is not graph-captured); sm_scale defaults to 1/sqrt(D).
    Returns (T, Hq, D) in q's dtype (into ``out`` if given, last dim contiguous).
    """
    t, hq, d = q.shape
    num_slots, page_size, d_pool = k_pool.shape
    hkv, max_pages = page_table.shape
    assert q.stride(2) == 1 and d_pool == d and hq % hkv == 0, f"q {tuple(q.shape)} vs pool {tuple(k_pool.shape)}"
    assert k_pool.is_contiguous() and v_pool.is_contiguous() and v_pool.shape == k_pool.shape
    assert q.dtype == k_pool.dtype == v_pool.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    assert page_table.dtype == torch.int32 and page_table.stride(1) == 1
    assert isinstance(start, int) and 0 <= start and start + t <= max_pages * page_size
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    block_d = next_pow2(d)
    block_m = block_m or (64 if t > 16 else 16)
    block_n = block_n or 64
    if out is None:
        out = torch.empty((t, hq, d), device=q.device, dtype=q.dtype)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1
    if t == 0:
        return out
    grid = (triton.cdiv(t, block_m), hq)
    launch_fitting_shared_memory(
        ("paged_prefill", q.device, q.dtype, d, hq // hkv, page_size, block_m, block_n), 2,
        lambda stages: _paged_prefill_kernel[grid](
            q, k_pool, v_pool, page_table, out, start, t, sm_scale * LOG2E,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_pool.stride(0), k_pool.stride(1),
            page_table.stride(0),
            G=hq // hkv, D=d, BLOCK_D=block_d, P=page_size, BLOCK_M=block_m, BLOCK_N=block_n,
            DOT_FP32=dot_upcast(q.dtype), PRECISION=dot_precision(q.dtype),
            num_warps=4 if block_d <= 64 else 8, num_stages=stages))
    return out
