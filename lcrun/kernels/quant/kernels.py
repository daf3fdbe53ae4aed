"""Triton kernels over quantized weights (planes of lcrun.kernels.quant.formats).

Both kernels read 4-bit ``qs`` as 32-bit words: nibble n of word i of a group holds element
32g + 4n + i (lcrun.kernels.quant.formats), so one shift of a group's four words lines up four
contiguous elements, which multiply four contiguous activations.

- ``qgemv``: decode, x (1, K) @ W^T. Memory-bound, so what limits it is the instructions per
  weight byte (an H200 issues about 33e12 per second: 11 per byte at 3 TB/s). Each program owns
  BLOCK_N rows (split-K only when rows alone give too few programs) and reads each weight byte
  once; codes become floats with two full-rate ALU ops; each group's dot product is taken on the
  codes and scaled once (no per-element dequantization); threads exchange nothing inside the
  loop. Split-K partials are summed by one torch add.
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
def _unit(code, BITS: tl.constexpr):
    """Codes 0 <= code < 2**BITS (int32) as fp32 1 + code / 2**BITS: the code becomes the top
    mantissa bits of 1.0 (a shift and an OR, full-rate ALU ops; an int-to-float convert runs at a
    quarter of the rate, and two per weight byte would cap the GEMV near half the HBM rate)."""
    return ((code << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)


@jit
def _code(w, h, n, i, FMT: tl.constexpr):
    """The code of element 32g + 4n + i of a 4-bit-based format: nibble n of ``qs`` word i (``w``)
    plus, for Q5_K / Q6_K, its high bits from ``h``: the group's 32-bit word of ``qh`` (Q5_K: bit
    4n + i) or the word of its half n // 4 (Q6_K: bits 8(n % 4) + 2i)."""
    code = (w >> (4 * n)) & 15
    if FMT == 4:
        code |= ((h >> (4 * n + i)) & 1) << 4
    if FMT == 5:
        code |= ((h >> (8 * (n % 4) + 2 * i)) & 3) << 4
    return code


@jit
def _gemv_tile(qs, d, m, sc, mn, qh, rows, g, end, N, K, QS_STRIDE, FMT: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_G: tl.constexpr):
    """What _qgemv_kernel reads from the weight for rows ``rows`` (BN,) and groups ``g`` (G,) below
    ``end``: ``qs`` words (BN, G, 4) (zeros for Q8_0, whose codes are read per nibble), high-bit
    words (BN, G, 1) and two fp32 (BN, G) factors: the scale and the offset per group (Q6_K: the
    scales of the group's two halves)."""
    row = rows.to(tl.int64)[:, None, None]
    grp = g[None, :, None]
    mask = (row < N) & (grp < end)
    row2 = rows.to(tl.int64)[:, None]
    g2 = g[None, :]
    mask2 = (row2 < N) & (g2 < end)
    if FMT == 0:
        w = tl.zeros((BLOCK_N, BLOCK_G, 4), dtype=tl.int32)
    else:
        w = tl.load(qs + row * QS_STRIDE + grp * 4 + tl.arange(0, 4)[None, None, :], mask=mask, other=0)
    h_a = tl.zeros((BLOCK_N, BLOCK_G, 1), dtype=tl.int32)
    h_b = tl.zeros((BLOCK_N, BLOCK_G, 1), dtype=tl.int32)
    s2 = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    if FMT == 4:
        h_a = tl.load(qh + row * (K // 32) + grp, mask=mask, other=0)
    if FMT == 5:
        h_a = tl.load(qh + row * (K // 16) + 2 * grp, mask=mask, other=0)
        h_b = tl.load(qh + row * (K // 16) + 2 * grp + 1, mask=mask, other=0)
    if FMT <= 2:  # Q8_0, Q4_0, Q4_1: d per group (Q4_1: + m)
        s1 = tl.load(d + row2 * (K // 32) + g2, mask=mask2, other=0).to(tl.float32)
        if FMT == 2:
            s2 = tl.load(m + row2 * (K // 32) + g2, mask=mask2, other=0).to(tl.float32)
    elif FMT == 5:  # Q6_K: d * sc of each half
        ds = tl.load(d + row2 * (K // 256) + g2 // 8, mask=mask2, other=0).to(tl.float32)
        s1 = ds * tl.load(sc + row2 * (K // 16) + 2 * g2, mask=mask2, other=0).to(tl.float32)
        s2 = ds * tl.load(sc + row2 * (K // 16) + 2 * g2 + 1, mask=mask2, other=0).to(tl.float32)
    else:  # Q4_K, Q5_K: d * sc and dmin * mn
        s1 = tl.load(d + row2 * (K // 256) + g2 // 8, mask=mask2, other=0).to(tl.float32) \
            * tl.load(sc + row2 * (K // 32) + g2, mask=mask2, other=0).to(tl.float32)
        s2 = tl.load(m + row2 * (K // 256) + g2 // 8, mask=mask2, other=0).to(tl.float32) \
            * tl.load(mn + row2 * (K // 32) + g2, mask=mask2, other=0).to(tl.float32)
    return w, h_a, h_b, s1, s2


@jit
def _qgemv_kernel(x, qs, d, m, sc, mn, qh, out, N, K, QS_STRIDE, GROUPS_PER_SPLIT,
                  FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """Rows [pid0 * BLOCK_N, +BLOCK_N) of x @ W^T over the 32-element groups of split pid1.

    ``qs`` comes as 32-bit words (4-bit formats: QS_STRIDE words per row) or int8 (Q8_0: bytes per
    row), ``qh`` as 32-bit words. A thread holds word i < 4 of (row, group) tiles (BLOCK_N,
    BLOCK_G, 4); for each nibble n < 8 one shift of those words lines up elements 32g + 4n + i,
    which multiply the four contiguous x[32g + 4n + i] (loaded once per thread, in the same
    layout for every row: no exchange between threads inside the loop) into a running FMA. Each
    group's dot product is taken on the codes and scaled once: with u = 1 + code / 2**B
    (``_unit``) and S the sum of the group's x,  sum code * x = 2**B * (sum u * x - S),  and the
    format's scale, zero point and offset are applied per (row, group). The next tile's loads are
    issued before this tile's arithmetic (the loop is latency-bound otherwise: a thread's loads
    would wait for its own arithmetic). The partial sums are reduced across threads once, after
    the loop. BLOCK_G = 32 * num_warps: x's tile is then spread over the threads exactly as the
    weight's."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = rows.to(tl.int64)[:, None, None]
    i = tl.arange(0, 4)[None, None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    g0 = tl.program_id(1) * GROUPS_PER_SPLIT
    end = tl.minimum(g0 + GROUPS_PER_SPLIT, K // 32)
    w, h_a, h_b, s1, s2 = _gemv_tile(qs, d, m, sc, mn, qh, rows, g0 + tl.arange(0, BLOCK_G), end, N, K, QS_STRIDE,
                                     FMT, BLOCK_N, BLOCK_G)
    for off in range(0, GROUPS_PER_SPLIT, BLOCK_G):
        g = g0 + off + tl.arange(0, BLOCK_G)
        w_next, h_a_next, h_b_next, s1_next, s2_next = _gemv_tile(qs, d, m, sc, mn, qh, rows, g + BLOCK_G, end, N, K,
                                                                   QS_STRIDE, FMT, BLOCK_N, BLOCK_G)
        grp = g[None, :, None]
        grp_ok = grp < end
        dot_a = tl.zeros((BLOCK_N, BLOCK_G, 4), dtype=tl.float32)  # elements 0..15 of each group (Q6_K), or all
        dot_b = tl.zeros((BLOCK_N, BLOCK_G, 4), dtype=tl.float32)  # Q6_K: elements 16..31
        x_a = tl.zeros((1, BLOCK_G, 4), dtype=tl.float32)
        x_b = tl.zeros((1, BLOCK_G, 4), dtype=tl.float32)
        for n in tl.static_range(8):
            xn = tl.load(x + grp * 32 + 4 * n + i, mask=grp_ok, other=0.0).to(tl.float32)
            if FMT == 0:  # Q8_0: int8 codes, shifted to 0..255
                u = _unit(tl.load(qs + row * QS_STRIDE + grp * 32 + 4 * n + i, mask=(row < N) & grp_ok,
                                  other=0).to(tl.int32) + 128, 8)
            elif FMT == 4:
                u = _unit(_code(w, h_a, n, i, FMT), 5)
            elif FMT == 5:
                if n < 4:
                    u = _unit(_code(w, h_a, n, i, FMT), 6)
                else:
                    u = _unit(_code(w, h_b, n, i, FMT), 6)
            else:
                u = _unit(_code(w, w, n, i, FMT), 4)
            if FMT == 5 and n >= 4:
                dot_b += u * xn
                x_b += xn
            else:
                dot_a += u * xn
                x_a += xn
        s_a = tl.sum(x_a, axis=2)
        if FMT == 5:  # Q6_K: d * sc * (q - 32), an int8 scale per 16 elements
            s_b = tl.sum(x_b, axis=2)
            acc += s1 * (64.0 * (tl.sum(dot_a, axis=2) - s_a) - 32.0 * s_a) \
                + s2 * (64.0 * (tl.sum(dot_b, axis=2) - s_b) - 32.0 * s_b)
        else:
            BITS: tl.constexpr = 8 if FMT == 0 else 5 if FMT == 4 else 4
            c = (1 << BITS) * (tl.sum(dot_a, axis=2) - s_a)
            if FMT == 0 or FMT == 1:  # Q8_0: d * q; Q4_0: d * (q - 8)
                zero: tl.constexpr = 128.0 if FMT == 0 else 8.0
                acc += s1 * (c - zero * s_a)
            elif FMT == 2:  # Q4_1: d * q + m
                acc += s1 * c + s2 * s_a
            else:  # Q4_K, Q5_K: d * sc * q - dmin * mn
                acc += s1 * c - s2 * s_a
        w, h_a, h_b, s1, s2 = w_next, h_a_next, h_b_next, s1_next, s2_next
    # out: (splits, N) fp32 partials, or with one split the result in its own dtype
    total = tl.sum(acc, axis=1)
    tl.store(out + tl.program_id(1) * N + rows, total.to(out.dtype.element_ty), mask=rows < N)


@jit
def _dequant_kernel(qs, d, m, sc, mn, qh, out, N, K, QS_STRIDE,
                    FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """Rows [pid0 * BLOCK_N, +BLOCK_N), groups [pid1 * BLOCK_G, +BLOCK_G) of W into ``out`` (N, K):
    tiles (BLOCK_N, BLOCK_G, 8, 4) of elements 32g + 4n + i (``qs``/``qh`` as in _qgemv_kernel)."""
    row = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[:, None, None, None]
    grp = (tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G))[None, :, None, None]
    n = tl.arange(0, 8)[None, None, :, None]
    i = tl.arange(0, 4)[None, None, None, :]
    mask = (row < N) & (grp < K // 32)
    e = grp * 32 + 4 * n + i
    if FMT == 0:  # Q8_0
        q = tl.load(qs + row * QS_STRIDE + e, mask=mask, other=0).to(tl.float32)
        val = tl.load(d + row * (K // 32) + grp, mask=mask, other=0).to(tl.float32) * q
    else:
        w = tl.load(qs + row * QS_STRIDE + grp * 4 + i, mask=mask, other=0)
        if FMT == 4:
            h = tl.load(qh + row * (K // 32) + grp, mask=mask, other=0)
        elif FMT == 5:
            h = tl.load(qh + row * (K // 16) + 2 * grp + n // 4, mask=mask, other=0)
        else:
            h = w
        q = _code(w, h, n, i, FMT).to(tl.float32)
        if FMT == 1:  # Q4_0
            val = tl.load(d + row * (K // 32) + grp, mask=mask, other=0).to(tl.float32) * (q - 8.0)
        elif FMT == 2:  # Q4_1
            val = tl.load(d + row * (K // 32) + grp, mask=mask, other=0).to(tl.float32) * q \
                + tl.load(m + row * (K // 32) + grp, mask=mask, other=0).to(tl.float32)
        elif FMT == 5:  # Q6_K
            val = tl.load(d + row * (K // 256) + grp // 8, mask=mask, other=0).to(tl.float32) \
                * tl.load(sc + row * (K // 16) + 2 * grp + n // 4, mask=mask, other=0).to(tl.float32) * (q - 32.0)
        else:  # Q4_K, Q5_K
            val = tl.load(d + row * (K // 256) + grp // 8, mask=mask, other=0).to(tl.float32) \
                * tl.load(sc + row * (K // 32) + grp, mask=mask, other=0).to(tl.float32) * q \
                - tl.load(m + row * (K // 256) + grp // 8, mask=mask, other=0).to(tl.float32) \
                * tl.load(mn + row * (K // 32) + grp, mask=mask, other=0).to(tl.float32)
    tl.store(out + row * K + e, val.to(out.dtype.element_ty), mask=mask)


def _plane_args(w: QuantWeight) -> list[torch.Tensor]:
    """The six plane pointers the kernels take: 4-bit ``qs`` and ``qh`` as 32-bit words (see the
    kernels); planes a format lacks get ``qs`` (never read)."""
    for t in w.planes.values():
        assert t.stride(-1) == 1 and t.stride(0) == t.shape[1], "quantized planes must be contiguous rows"
    planes = dict(w.planes)
    if w.fmt != "Q8_0":
        planes["qs"] = planes["qs"].view(torch.int32)
    if "qh" in planes:
        planes["qh"] = planes["qh"].view(torch.int32)
    return [planes.get(p, planes["qs"]) for p in ("qs", "d", "m", "sc", "mn", "qh")]


def _qs_stride(w: QuantWeight) -> int:
    """The ``qs`` row stride in the kernels' units: 32-bit words (4-bit formats) or bytes (Q8_0)."""
    qs = w.planes["qs"]
    return qs.stride(0) if w.fmt == "Q8_0" else qs.stride(0) // 4


@functools.cache
def gemv_config(n: int, k: int, sm_count: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_P, splits, num_warps) for a decode GEMV: rows per program, bytes of a 4-bit
    row per iteration (16 per group: BLOCK_P / 16 = BLOCK_G = 32 * num_warps), split-K factor and
    warps. The most rows per program (up to 8: registers) that still give >= 3 programs per SM;
    split-K (a second kernel sums the partials) only where even one row per program gives fewer
    programs than SMs. perf/bench_qgemv.py sweeps the alternatives."""
    if interpreting():  # few, large programs: the interpreter pays per program
        return 16, 128, 1, 1
    warps = 2
    block_n = next((b for b in (8, 4, 2) if triton.cdiv(n, b) >= 3 * sm_count), 1)
    splits = 1
    while n * splits < sm_count and (k // 32) // (2 * splits) >= 32 * warps:
        splits *= 2
    return block_n, 512 * warps, splits, warps


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
    block_g = block_p // 16  # BLOCK_P: bytes of a 4-bit row per iteration, 16 per group
    groups = triton.cdiv(triton.cdiv(k // 32, splits), block_g) * block_g
    out = torch.empty((splits, n), dtype=torch.float32 if splits > 1 else x.dtype, device=x.device)
    _qgemv_kernel[(triton.cdiv(n, block_n), splits)](
        x, *_plane_args(w), out, n, k, _qs_stride(w), groups, FMT=FORMATS[w.fmt].code, BLOCK_N=block_n,
        BLOCK_G=block_g, num_warps=warps)
    return out if splits == 1 else out.sum(0, keepdim=True).to(x.dtype)


def dequantize(w: QuantWeight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """w (N, K) -> (N, K) ``dtype`` on w's device (written into ``out`` when given: (N, K), contiguous)."""
    n, k = w.shape
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=w.device)
    assert out.shape == (n, k) and out.is_contiguous() and out.dtype == dtype
    block_n, block_g = (16, 8) if interpreting() else (8, 4)
    _dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k // 32, block_g))](
        *_plane_args(w), out, n, k, _qs_stride(w), FMT=FORMATS[w.fmt].code, BLOCK_N=block_n, BLOCK_G=block_g)
    return out
