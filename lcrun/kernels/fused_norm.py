"""Fused RMSNorm, optionally with the residual add before it: one launch where torch needs ~8.

The torch reference beside the kernel is the model's original code (HF LlamaRMSNorm's order of
roundings) and is what runs on CPU. This module imports without Triton: the kernel is decorated
on first use (``lazy_jit``), so importing the model does not fix interpreter-or-GPU mode early.
"""
from __future__ import annotations

import torch

from lcrun.kernels.triton_support import lazy_jit, next_pow2, tl, use_triton

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The torch version of ``rms_norm`` (same arguments and results), any leading dims."""
    if residual is not None:
        s = x + residual
        return rms_norm_reference(s, weight, eps), s
    # fp32 statistics, then the weight applied in the activation dtype: as HF's LlamaRMSNorm.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rms_norm_kernel(x, res, w, out, s_out, stride_x, stride_r, stride_o, stride_s, n, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    xv = tl.load(x + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        # Add in fp32 and round to x's dtype, as torch's x + residual does (not a native bf16 add).
        rv = tl.load(res + row * stride_r + offs, mask=mask, other=0.0)
        xv = (xv.to(tl.float32) + rv.to(tl.float32)).to(s_out.dtype.element_ty)
        tl.store(s_out + row * stride_s + offs, xv, mask=mask)
    xf = xv.to(tl.float32)
    # IEEE sqrt and division: the CPU reference's rsqrt is correctly rounded; approximations would
    # add ulps on top of the (unavoidable) different summation order.
    inv = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(xf * xf, axis=0) / n + eps))
    normed = (xf * inv).to(x.dtype.element_ty).to(tl.float32)  # rounded to x's dtype, as .to(x.dtype)
    wv = tl.load(w + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + row * stride_o + offs, (normed * wv).to(out.dtype.element_ty), mask=mask)


_kernel = lazy_jit(_rms_norm_kernel)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             backend: str = "auto") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of each row of x (or of s = x + residual), as HF's LlamaRMSNorm rounds it.

    x: (T, hidden) fp32/fp16/bf16, last dim contiguous; weight: (hidden,) contiguous, any of those
    dtypes; residual: None or like x (same shape and dtype, last dim contiguous).
    Returns ``weight * (xf * rsqrt(mean(xf^2) + eps)).to(x.dtype)`` with xf = x.float(), in
    ``torch.promote_types(x.dtype, weight.dtype)``, shape (T, hidden); with a residual, the pair
    (that of s, s) where s = x + residual in x's dtype (new contiguous tensors). One launch, no host
    sync, shape-determined grid: CUDA-graph capturable. ``backend``: see ``use_triton``.
    """
    if not use_triton(x.device, backend):
        return rms_norm_reference(x, weight, eps, residual)
    _check(x, weight, residual)
    t, n = x.shape
    out = torch.empty((t, n), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    s = torch.empty((t, n), dtype=x.dtype, device=x.device) if residual is not None else None
    if t:
        block = next_pow2(n)
        res = residual if residual is not None else x  # placeholders: HAS_RES=False never reads them
        s_arg = s if s is not None else out
        _kernel()[(t,)](x, res, weight, out, s_arg, x.stride(0), res.stride(0), out.stride(0), s_arg.stride(0),
                        n, eps, HAS_RES=residual is not None, BLOCK=block,
                        num_warps=4 if block <= 2048 else 8 if block <= 8192 else 16)
    return out if s is None else (out, s)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    assert x.dim() == 2 and x.stride(1) == 1, f"x must be (T, hidden) with a contiguous last dim, got {tuple(x.shape)}"
    assert x.dtype in FLOAT_DTYPES and weight.dtype in FLOAT_DTYPES, f"dtypes {x.dtype}, {weight.dtype}"
    assert weight.shape == (x.shape[1],) and weight.is_contiguous(), f"weight {tuple(weight.shape)}"
    assert weight.device == x.device, f"x on {x.device}, weight on {weight.device}"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.device == x.device, \
            f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}"
        assert residual.stride(1) == 1, "residual: last dim contiguous"
