"""The model's one linear and one embedding lookup, for plain tensors and quantized weights.

bf16/fp16/fp32 tensors go to torch. A QuantWeight goes to the Triton kernels on the GPU (decode:
the GEMV; T > 1: dequantize into scratch, then torch's matmul) and to the plain-torch dequantizer
on the CPU (``backend``, as lcrun.kernels.triton_support.use_triton).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lcrun.kernels.quant.weight import QuantWeight, RowConcat, Weight
from lcrun.kernels.triton_support import use_triton

# Prefill dequantizes a weight into scratch this many bytes at a time (rows in chunks): the fused
# gate/up of an 8B model (235 MB in bf16) in one piece, a 128K-vocab output head (1 GB) in four.
SCRATCH_BYTES = 256 << 20


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """x (T, K) @ w^T (+ bias): (T, N) in x's dtype. w: (N, K) tensor, QuantWeight or RowConcat."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    if isinstance(w, RowConcat):
        out = torch.cat([linear(x, p, None, backend) for p in w.parts], dim=-1)
    else:
        out = _quant_linear(x, w, backend)
    return out if bias is None else out + bias


def _quant_linear(x: torch.Tensor, w: QuantWeight, backend: str) -> torch.Tensor:
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear: x has {x.shape[-1]} features, the {w.fmt} weight {w.shape} wants {w.shape[1]}")
    if not use_triton(x.device, backend):
        return F.linear(x, w.dequantize_reference().to(x.dtype))
    from lcrun.kernels.quant.kernels import dequantize, qgemv
    if x.shape[0] == 1:
        return qgemv(x, w)
    n, k = w.shape
    rows = max(1, SCRATCH_BYTES // (k * x.element_size()))
    outs = [F.linear(x, dequantize(w.rows(r, min(n, r + rows)), x.dtype)) for r in range(0, n, rows)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def embedding(ids: torch.Tensor, table: torch.Tensor | QuantWeight, dtype: torch.dtype,
              backend: str = "auto") -> torch.Tensor:
    """Rows ``ids`` (T,) int64 of an embedding table (vocab, hidden) as (T, hidden) ``dtype``: a
    quantized table dequantizes only the selected rows."""
    if isinstance(table, torch.Tensor):
        return F.embedding(ids, table)
    picked = table.take_rows(ids)
    if not use_triton(ids.device, backend):
        return picked.dequantize_reference().to(dtype)
    from lcrun.kernels.quant.kernels import dequantize
    return dequantize(picked, dtype)
