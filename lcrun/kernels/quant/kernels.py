"""Triton kernels over quantized weights (planes of lcrun.kernels.quant.formats).

Both kernels walk a weight in *pairs*: pair i of a row is byte i of its 4-bit ``qs`` plane, i.e.
elements e = 32(i//16) + i%16 and e + 16; every format (Q8_0 too) is read pair-wise so one
dequantizer serves all. The activations are loaded in the same pair order, so the weight is never
reshuffled in registers.

- ``qgemv``: decode, x (1, K) @ W^T. Memory-bound: each program owns BLOCK_N rows and a K slice
  (split-K when rows alone give too few programs), reads each weight byte once with contiguous
  per-row loads, dequantizes in registers and accumulates in fp32; split-K partials are summed by
  one torch add.
- ``dequantize``: the whole weight into a (N, K) scratch tensor in the compute dtype, for
  prefill (T > 1), which then runs torch's matmul (the scratch path: the simplest correct
  prefill; a GEMM dequantizing tiles in place would save the scratch write and read).
Imported on first use (lcrun.kernels.quant.linear), so the interpreter-or-GPU mode is fixed then.
"""
from __future__ import annotations

import functools

import torch

from lcrun.kernels.quant.formats import FORMATS
from lcrun.kernels.quant.weight import QuantWeight
from lcrun.kernels.triton_support import interpreting, jit, tl, triton


@jit
def _dequant_pairs(qs, d, m, sc, mn, qh, row, grp, j, mask, K, QS_STRIDE, FMT: tl.constexpr):
    """Weights of rows ``row`` (BN, 1, 1) int64 in 32-element groups ``grp`` (1, G, 1), pair j
    (1, 1, 16) of each: returns (w_lo, w_hi) fp32 (BN, G, 16), elements e = 32 grp + j and e + 16
    (pair i = 16 grp + j is byte i of ``qs``). ``mask`` (BN, G, 1): valid rows and groups. Scales
    are loaded once per group (shape (BN, G, 1)), not once per element. QS_STRIDE is the ``qs`` row
    stride (passed so Triton sees its divisibility by 16); the small planes' strides derive from K."""
    e = grp * 32 + j
    # one return at the end: every branch below is resolved at compile time (FMT is constexpr)
    if FMT == 0:  # Q8_0
        s = tl.load(d + row * (K // 32) + grp, mask=mask, other=0.0).to(tl.float32)
        w_lo = s * tl.load(qs + row * QS_STRIDE + e, mask=mask, other=0).to(tl.float32)
        w_hi = s * tl.load(qs + row * QS_STRIDE + e + 16, mask=mask, other=0).to(tl.float32)
    else:
        byte = tl.load(qs + row * QS_STRIDE + grp * 16 + j, mask=mask, other=0).to(tl.int32)
        q_lo = byte & 15
        q_hi = byte >> 4
        if FMT == 1:  # Q4_0
            s = tl.load(d + row * (K // 32) + grp, mask=mask, other=0.0).to(tl.float32)
            w_lo = s * (q_lo - 8).to(tl.float32)
            w_hi = s * (q_hi - 8).to(tl.float32)
        elif FMT == 2:  # Q4_1
            s = tl.load(d + row * (K // 32) + grp, mask=mask, other=0.0).to(tl.float32)
            o = tl.load(m + row * (K // 32) + grp, mask=mask, other=0.0).to(tl.float32)
            w_lo = s * q_lo.to(tl.float32) + o
            w_hi = s * q_hi.to(tl.float32) + o
        elif FMT == 5:  # Q6_K: 2 high bits per element, int8 scale per 16 elements
            ds = tl.load(d + row * (K // 256) + grp // 8, mask=mask, other=0.0).to(tl.float32)
            h_lo = tl.load(qh + row * (K // 4) + e // 4, mask=mask, other=0).to(tl.int32)
            h_hi = tl.load(qh + row * (K // 4) + (e + 16) // 4, mask=mask, other=0).to(tl.int32)
            q_lo = q_lo | (((h_lo >> (2 * (e % 4))) & 3) << 4)
            q_hi = q_hi | (((h_hi >> (2 * (e % 4))) & 3) << 4)
            s_lo = tl.load(sc + row * (K // 16) + 2 * grp, mask=mask, other=0).to(tl.float32)
            s_hi = tl.load(sc + row * (K // 16) + 2 * grp + 1, mask=mask, other=0).to(tl.float32)
            w_lo = (ds * s_lo) * (q_lo - 32).to(tl.float32)
            w_hi = (ds * s_hi) * (q_hi - 32).to(tl.float32)
        else:  # Q4_K (3), Q5_K (4)
            if FMT == 4:  # one high bit per element
                h_lo = tl.load(qh + row * (K // 8) + e // 8, mask=mask, other=0).to(tl.int32)
                h_hi = tl.load(qh + row * (K // 8) + (e + 16) // 8, mask=mask, other=0).to(tl.int32)
                q_lo = q_lo | (((h_lo >> (e % 8)) & 1) << 4)
                q_hi = q_hi | (((h_hi >> (e % 8)) & 1) << 4)
            ds = tl.load(d + row * (K // 256) + grp // 8, mask=mask, other=0.0).to(tl.float32)
            dm = tl.load(m + row * (K // 256) + grp // 8, mask=mask, other=0.0).to(tl.float32)
            s = ds * tl.load(sc + row * (K // 32) + grp, mask=mask, other=0).to(tl.float32)
            o = dm * tl.load(mn + row * (K // 32) + grp, mask=mask, other=0).to(tl.float32)
            w_lo = s * q_lo.to(tl.float32) - o
            w_hi = s * q_hi.to(tl.float32) - o
    return w_lo, w_hi


@jit
def _qgemv_kernel(x, qs, d, m, sc, mn, qh, out, N, K, QS_STRIDE, PAIRS_PER_SPLIT,
                  FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    row = rows.to(tl.int64)[:, None, None]
    row_ok = row < N
    j = tl.arange(0, 16)[None, None, :]
    # reduced every iteration: a (BLOCK_N,) accumulator leaves registers for large tiles, and
    # large tiles keep more bytes in flight per program (a memory-bound kernel wants that)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    p0 = split * PAIRS_PER_SPLIT
    for off in range(0, PAIRS_PER_SPLIT, BLOCK_P):
        grp = ((p0 + off) // 16 + tl.arange(0, BLOCK_P // 16))[None, :, None]
        grp_ok = grp < K // 32
        e = grp * 32 + j
        x_lo = tl.load(x + e, mask=grp_ok, other=0.0).to(tl.float32)
        x_hi = tl.load(x + e + 16, mask=grp_ok, other=0.0).to(tl.float32)
        w_lo, w_hi = _dequant_pairs(qs, d, m, sc, mn, qh, row, grp, j, row_ok & grp_ok, K, QS_STRIDE, FMT)
        acc += tl.sum(tl.sum(w_lo * x_lo + w_hi * x_hi, axis=2), axis=1)
    # out: (splits, N) fp32 partials, or with one split the result in its own dtype
    tl.store(out + split * N + rows, acc.to(out.dtype.element_ty), mask=rows < N)


@jit
def _dequant_kernel(qs, d, m, sc, mn, qh, out, N, K, QS_STRIDE,
                    FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    row = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[:, None, None]
    grp = (tl.program_id(1) * (BLOCK_P // 16) + tl.arange(0, BLOCK_P // 16))[None, :, None]
    j = tl.arange(0, 16)[None, None, :]
    mask = (row < N) & (grp < K // 32)
    w_lo, w_hi = _dequant_pairs(qs, d, m, sc, mn, qh, row, grp, j, mask, K, QS_STRIDE, FMT)
    e = grp * 32 + j
    tl.store(out + row * K + e, w_lo.to(out.dtype.element_ty), mask=mask)
    tl.store(out + row * K + e + 16, w_hi.to(out.dtype.element_ty), mask=mask)


def _plane_args(w: QuantWeight) -> list[torch.Tensor]:
    """The six plane pointers the kernels take; planes a format lacks get ``qs`` (never read)."""
    for t in w.planes.values():
        assert t.stride(-1) == 1 and t.stride(0) == t.shape[1], "quantized planes must be contiguous rows"
    return [w.planes.get(p, w.planes["qs"]) for p in ("qs", "d", "m", "sc", "mn", "qh")]


def _qs_stride(w: QuantWeight) -> int:
    return w.planes["qs"].stride(0)


@functools.cache
def gemv_config(n: int, k: int, sm_count: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_P, splits, num_warps) for a decode GEMV: rows per program, pairs per
    iteration, split-K factor and warps, aiming at >= 4 programs per SM so the loads keep the
    memory system full. Not yet tuned on a GPU: perf/bench_qgemv.py sweeps the alternatives."""
    if interpreting():  # few, large programs: the interpreter pays per program
        return 16, 128, 1, 4
    block_n, block_p = 16, 256
    programs = triton.cdiv(n, block_n)
    pairs = k // 2
    splits = 1
    while programs * splits < 4 * sm_count and pairs // (2 * splits) >= 4 * block_p:
        splits *= 2
    return block_n, block_p, splits, 4


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def qgemv(x: torch.Tensor, w: QuantWeight, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x (1, K) or (K,) fp32/fp16/bf16, contiguous; w (N, K) on x's device. Returns x @ W^T as
    (1, N) in x's dtype (accumulated in fp32). ``config``: (BLOCK_N, BLOCK_P, splits, num_warps)
    to override gemv_config (benchmarks sweep it)."""
    n, k = w.shape
    if x.numel() != k or x.dim() > 2:
        raise ValueError(f"qgemv wants x of K={k} elements as (1, K) or (K,), got {tuple(x.shape)}")
    assert x.device == w.device, (x.device, w.device)
    x = x.reshape(-1).contiguous()
    block_n, block_p, splits, warps = config or gemv_config(n, k, _sm_count(x.device))
    pairs = triton.cdiv(triton.cdiv(k // 2, splits), block_p) * block_p
    out = torch.empty((splits, n), dtype=torch.float32 if splits > 1 else x.dtype, device=x.device)
    _qgemv_kernel[(triton.cdiv(n, block_n), splits)](
        x, *_plane_args(w), out, n, k, _qs_stride(w), pairs, FMT=FORMATS[w.fmt].code, BLOCK_N=block_n, BLOCK_P=block_p,
        num_warps=warps)
    return out if splits == 1 else out.sum(0, keepdim=True).to(x.dtype)


def dequantize(w: QuantWeight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """w (N, K) -> (N, K) ``dtype`` on w's device (written into ``out`` when given: (N, K), contiguous)."""
    n, k = w.shape
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=w.device)
    assert out.shape == (n, k) and out.is_contiguous() and out.dtype == dtype
    block_n, block_p = (16, 128) if interpreting() else (16, 64)
    _dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k // 2, block_p))](
        *_plane_args(w), out, n, k, _qs_stride(w), FMT=FORMATS[w.fmt].code, BLOCK_N=block_n, BLOCK_P=block_p)
    return out
