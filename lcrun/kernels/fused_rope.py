"""Fused rotary embedding ('rotate_half' layout) of q and k in one launch, torch's roundings kept
(``rope_qk``; ``rope_three`` also places q at a second set of positions in the same launch).

torch computes ``x * cos + rotate_half(x) * sin`` in three rounded steps (two products, one sum,
each rounded to the tensor dtype); the kernel does the same, so the CUDA path and the torch
reference (the CPU path) give bit-identical results. Like ``fused_norm``, this module imports
without Triton and decorates its kernel on first use.
"""
from __future__ import annotations

import torch

from lcrun.kernels.fused_norm import FLOAT_DTYPES
from lcrun.kernels.triton_support import lazy_jit, next_pow2, tl, use_triton


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, H, D); cos/sin broadcastable to it, e.g. (T, 1, D). Any dtypes (torch promotion)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def fusable(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the kernel takes these (else only the reference): x (T, H, D) with a contiguous last
    dim, even D; cos and sin (T, 1, D) with contiguous last dims; one float dtype for all three."""
    if x.dim() != 3 or x.shape[-1] % 2 or x.stride(-1) != 1 or x.dtype not in FLOAT_DTYPES:
        return False
    want = (x.shape[0], 1, x.shape[2])
    return all(c.shape == want and c.stride(-1) == 1 and c.dtype == x.dtype and c.device == x.device
               for c in (cos, sin))


def _rope_kernel(q, k, cos, sin, cos_k, sin_k, cos_2, sin_2, q_out, k_out, q2_out,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st, stride_ckt, stride_skt,
                 stride_c2t, stride_s2t, stride_qot, stride_qoh, stride_kot, stride_koh, stride_q2t, stride_q2h,
                 HQ: tl.constexpr, HKV: tl.constexpr, HQ2: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # One program per token: rows [0, HQ) are q's heads at (cos, sin), [HQ, HQ+HKV) k's at
    # (cos_k, sin_k), then HQ2 rows of q's heads again at (cos_2, sin_2) into q2_out (HQ2 = 0 or
    # HQ), as one (BLOCK_H, HALF) tile per half; each cos/sin row is read once for all heads.
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    d_ok = (d < HALF)[None, :]
    is_q = (h < HQ)[:, None] & d_ok
    is_k = ((h >= HQ) & (h < HQ + HKV))[:, None] & d_ok
    is_q2 = ((h >= HQ + HKV) & (h < HQ + HKV + HQ2))[:, None] & d_ok
    hk = (h - HQ)[:, None]         # k's head index (negative on q's rows, which never use it)
    h2 = (h - HQ - HKV)[:, None]   # the second q's head index
    from_q = is_q | is_q2
    q_src = q + t * stride_qt + tl.where(is_q, h[:, None], h2) * stride_qh + d[None, :]
    k_src = k + t * stride_kt + hk * stride_kh + d[None, :]
    x1 = tl.where(from_q, tl.load(q_src, mask=from_q), tl.load(k_src, mask=is_k))
    x2 = tl.where(from_q, tl.load(q_src + HALF, mask=from_q), tl.load(k_src + HALF, mask=is_k))
    half = d < HALF
    c1 = tl.load(cos + t * stride_ct + d, mask=half)[None, :].to(tl.float32)
    c2 = tl.load(cos + t * stride_ct + HALF + d, mask=half)[None, :].to(tl.float32)
    s1 = tl.load(sin + t * stride_st + d, mask=half)[None, :].to(tl.float32)
    s2 = tl.load(sin + t * stride_st + HALF + d, mask=half)[None, :].to(tl.float32)
    c1 = tl.where(is_k, tl.load(cos_k + t * stride_ckt + d, mask=half)[None, :].to(tl.float32), c1)
    c2 = tl.where(is_k, tl.load(cos_k + t * stride_ckt + HALF + d, mask=half)[None, :].to(tl.float32), c2)
    s1 = tl.where(is_k, tl.load(sin_k + t * stride_skt + d, mask=half)[None, :].to(tl.float32), s1)
    s2 = tl.where(is_k, tl.load(sin_k + t * stride_skt + HALF + d, mask=half)[None, :].to(tl.float32), s2)
    if HQ2 > 0:
        c1 = tl.where(is_q2, tl.load(cos_2 + t * stride_c2t + d, mask=half)[None, :].to(tl.float32), c1)
        c2 = tl.where(is_q2, tl.load(cos_2 + t * stride_c2t + HALF + d, mask=half)[None, :].to(tl.float32), c2)
        s1 = tl.where(is_q2, tl.load(sin_2 + t * stride_s2t + d, mask=half)[None, :].to(tl.float32), s1)
        s2 = tl.where(is_q2, tl.load(sin_2 + t * stride_s2t + HALF + d, mask=half)[None, :].to(tl.float32), s2)
    ty = q_out.dtype.element_ty
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    # x * cos + cat(-x2, x1) * sin with each product and the sum rounded to the dtype, as torch's
    # three ops do (for fp32 the launch turns off FMA contraction for the same reason).
    o1 = ((x1 * c1).to(ty).to(tl.float32) - (x2 * s1).to(ty).to(tl.float32)).to(ty)
    o2 = ((x2 * c2).to(ty).to(tl.float32) + (x1 * s2).to(ty).to(tl.float32)).to(ty)
    q_dst = q_out + t * stride_qot + h[:, None] * stride_qoh + d[None, :]
    k_dst = k_out + t * stride_kot + hk * stride_koh + d[None, :]
    q2_dst = q2_out + t * stride_q2t + h2 * stride_q2h + d[None, :]
    tl.store(q_dst, o1, mask=is_q)
    tl.store(q_dst + HALF, o2, mask=is_q)
    tl.store(k_dst, o1, mask=is_k)
    tl.store(k_dst + HALF, o2, mask=is_k)
    tl.store(q2_dst, o1, mask=is_q2)
    tl.store(q2_dst + HALF, o2, mask=is_q2)


_kernel = lazy_jit(_rope_kernel)


def rope_qk(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
            backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotary embedding of q and k at the positions cos/sin were made for, in one launch.

    q: (T, Hq, D), k: (T, Hkv, D) or None; both may be strided views (e.g. slices of a fused qkv
    projection) with a contiguous last dim. cos, sin: (T, 1, D) as ``Rotary.cos_sin`` makes them,
    q's dtype (fp32/fp16/bf16). Returns new contiguous (q_rot, k_rot) (k_rot None if k is), equal
    to ``rope_reference`` of each. ``auto`` runs the kernel on CUDA when ``fusable`` says the inputs
    fit it, else the reference; ``triton`` requires that they fit. No host sync: graph capturable.
    """
    q_rot, k_rot, _ = rope_three(q, k, (cos, sin), (cos, sin), None, backend)
    return q_rot, k_rot


CosSin = tuple[torch.Tensor, torch.Tensor]


def rope_three(q: torch.Tensor, k: torch.Tensor | None, q_at: CosSin, k_at: CosSin, q2_at: CosSin | None,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """q rotated at ``q_at``, k at ``k_at`` and, unless ``q2_at`` is None, q again at ``q2_at``,
    in one launch (a window-position decode step places its query, its scoring query and its key
    at three positions: lcrun.runtime.positions). Shapes and dtypes as ``rope_qk``, each cos/sin
    pair (T, 1, D). Returns (q_rot, k_rot or None, q2_rot or None), each equal to
    ``rope_reference`` of its input at its positions (bit for bit)."""
    inputs = [(q, q_at)] + ([(k, k_at)] if k is not None else []) + ([(q, q2_at)] if q2_at is not None else [])
    fits = all(fusable(x, *at) for x, at in inputs)
    if not use_triton(q.device, backend) or (backend == "auto" and not fits):
        return (rope_reference(q, *q_at), None if k is None else rope_reference(k, *k_at),
                None if q2_at is None else rope_reference(q, *q2_at))
    assert fits, (f"q {tuple(q.shape)} {q.dtype}, k {None if k is None else (tuple(k.shape), k.dtype)}, "
                  f"cos/sin {[tuple(at[0].shape) for _, at in inputs]}: see fusable()")
    t, hq, d = q.shape
    kk = k if k is not None else q[:, :0]  # no k: a 0-head view, never read
    assert kk.shape[0] == t and kk.shape[2] == d, f"q {tuple(q.shape)} and k {tuple(kk.shape)} differ"
    hkv, hq2 = kk.shape[1], 0 if q2_at is None else hq
    q_out, k_out = torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(kk, memory_format=torch.contiguous_format)
    q2_out = torch.empty_like(q_out) if hq2 else q_out[:, :0]
    (cos, sin), (cos_k, sin_k) = q_at, k_at
    cos_2, sin_2 = q2_at if hq2 else q_at
    if t:
        block_h = next_pow2(hq + hkv + hq2)
        _kernel()[(t,)](q, kk, cos, sin, cos_k, sin_k, cos_2, sin_2, q_out, k_out, q2_out,
                        q.stride(0), q.stride(1), kk.stride(0), kk.stride(1), cos.stride(0), sin.stride(0),
                        cos_k.stride(0), sin_k.stride(0), cos_2.stride(0), sin_2.stride(0),
                        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
                        q2_out.stride(0), q2_out.stride(1),
                        HQ=hq, HKV=hkv, HQ2=hq2, HALF=d // 2, BLOCK_H=block_h, BLOCK_HALF=next_pow2(d // 2),
                        num_warps=4 if block_h * d <= 4096 else 8, enable_fp_fusion=False)
    return q_out, None if k is None else k_out, q2_out if hq2 else None
