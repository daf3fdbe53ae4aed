"""Quantized weights: planes vs gguf's own dequantizer, and the Triton GEMV / dequantize kernels
(interpreter on the CPU) vs a matmul with gguf.quants.dequantize of the same blocks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from lcrun.kernels.quant.formats import FORMATS
from lcrun.kernels.quant.weight import QuantWeight, RowConcat, cat_rows
from tests.triton_env import DEVICE, HAS_TRITON

ALL = list(FORMATS)
QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1")  # gguf has quantizers for these; K-quants get random blocks


def gguf_blocks(fmt: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """(n, k/block * block_bytes) uint8 GGUF blocks: quantized by gguf where it can, else random
    bytes with sane fp16 scales (the d/dmin fields)."""
    f = FORMATS[fmt]
    rng = np.random.default_rng(seed)
    if fmt in QUANTIZABLE:
        return gguf_quantize(rng.standard_normal((n, k)).astype(np.float32), f.ggml)
    raw = rng.integers(0, 256, (n * k // f.block, f.block_bytes), dtype=np.uint8)
    scales = (rng.random((raw.shape[0], 2)) * 0.01 + 0.001).astype(np.float16).view(np.uint8)
    if fmt == "Q6_K":
        raw[:, 208:210] = scales[:, 0:2]
    else:  # Q4_K / Q5_K: d and dmin first
        raw[:, 0:4] = scales
    return raw.reshape(n, -1)


def reference(fmt: str, raw: np.ndarray, n: int, k: int) -> torch.Tensor:
    return torch.from_numpy(gguf_dequantize(raw, FORMATS[fmt].ggml).reshape(n, k).astype(np.float32))


@pytest.mark.parametrize("fmt", ALL)
def test_planes_dequantize_like_gguf(fmt):
    n, k = 7, 512
    raw = gguf_blocks(fmt, n, k)
    w = QuantWeight.from_gguf(fmt, raw, n, k)
    assert w.nbytes >= raw.nbytes and w.nbytes <= raw.nbytes * 1.03
    torch.testing.assert_close(w.dequantize_reference(), reference(fmt, raw, n, k), rtol=1e-6, atol=1e-6)


def test_cat_rows_keeps_formats_apart():
    a = QuantWeight.from_gguf("Q4_0", gguf_blocks("Q4_0", 3, 64), 3, 64)
    b = QuantWeight.from_gguf("Q4_0", gguf_blocks("Q4_0", 2, 64, seed=1), 2, 64)
    c = QuantWeight.from_gguf("Q8_0", gguf_blocks("Q8_0", 4, 64), 4, 64)
    ab = cat_rows([a, b])
    assert isinstance(ab, QuantWeight) and ab.shape == (5, 64)
    torch.testing.assert_close(ab.dequantize_reference(),
                               torch.cat([a.dequantize_reference(), b.dequantize_reference()]))
    mixed = cat_rows([a, b, c])
    assert isinstance(mixed, RowConcat) and [p.fmt for p in mixed.parts] == ["Q4_0", "Q8_0"]
    part = mixed.rows(4, 7)
    assert isinstance(part, RowConcat) and part.shape == (3, 64)


needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton kernels cannot run here")


@needs_triton
@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("n", [5, 33])
def test_gemv_matches_gguf_matmul(fmt, n):
    from lcrun.kernels.quant.kernels import qgemv
    k = 512
    raw = gguf_blocks(fmt, n, k, seed=n)
    w = QuantWeight.from_gguf(fmt, raw, n, k).to(DEVICE)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    expected = x.cpu() @ reference(fmt, raw, n, k).T
    torch.testing.assert_close(qgemv(x, w).cpu(), expected, rtol=1e-4, atol=1e-4)
    # split-K sums the same products in another order
    torch.testing.assert_close(qgemv(x, w, config=(4, 64, 3, 4)).cpu(), expected, rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("fmt", ALL)
def test_dequantize_kernel_matches_gguf(fmt):
    from lcrun.kernels.quant.kernels import dequantize
    n, k = 19, 768 if fmt not in ("Q4_K", "Q5_K", "Q6_K") else 512
    raw = gguf_blocks(fmt, n, k, seed=3)
    w = QuantWeight.from_gguf(fmt, raw, n, k).to(DEVICE)
    torch.testing.assert_close(dequantize(w, torch.float32).cpu(), reference(fmt, raw, n, k), rtol=1e-6, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("fmt", ["Q4_1", "Q6_K"])
@pytest.mark.parametrize("t", [1, 3])
def test_linear_and_embedding_dispatch(fmt, t, monkeypatch):
    """T = 1 runs the GEMV, T = 3 the dequantize-to-scratch path (in row chunks, forced small
    here), bf16 activations; the torch backend gives the same; embeddings pick dequantized rows."""
    from lcrun.kernels.quant import linear as ql
    n, k = 37, 512
    raw = gguf_blocks(fmt, n, k, seed=t)
    w = QuantWeight.from_gguf(fmt, raw, n, k).to(DEVICE)
    monkeypatch.setattr(ql, "SCRATCH_BYTES", 10 * k * 2)  # 10 rows per chunk
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16)
    expected = x.float() @ reference(fmt, raw, n, k).T + bias.float()
    for backend in ("triton", "torch"):
        got = ql.linear(x.to(DEVICE), w, bias.to(DEVICE), backend=backend).cpu()
        assert got.dtype == torch.bfloat16 and got.shape == (t, n)
        # bf16 output, and the bias added in bf16: a few ulps of the largest outputs
        assert (got.float() - expected).abs().max() <= 2e-2 * expected.abs().max()
    ids = torch.tensor([4, 0, 36])
    for backend in ("triton", "torch"):
        rows = ql.embedding(ids.to(DEVICE), w, torch.float32, backend=backend).cpu()
        torch.testing.assert_close(rows, reference(fmt, raw, n, k)[ids])


@pytest.mark.parametrize("fmt", ALL)
def test_random_quant_has_the_asked_spread(fmt):
    from lcrun.kernels.quant.quantize import random_quant
    w = random_quant(fmt, 64, 512, torch.device("cpu"), torch.Generator().manual_seed(0), std=0.02)
    v = w.dequantize_reference()
    assert abs(v.mean().item()) < 0.15 * 0.02 and 0.015 < v.std().item() < 0.025  # Q4_0 centres on q = 8.5


def test_quantize_rounds_as_gguf_and_refuses_what_it_cannot():
    from lcrun.errors import ConfigError
    from lcrun.kernels.quant.quantize import quantize
    dense = torch.randn(6, 64)
    w = quantize(dense, "Q8_0")
    expected = gguf_dequantize(gguf_quantize(dense.numpy(), FORMATS["Q8_0"].ggml), FORMATS["Q8_0"].ggml)
    torch.testing.assert_close(w.dequantize_reference(), torch.from_numpy(expected.reshape(6, 64)))
    with pytest.raises(ConfigError, match="not whole Q4_0 blocks"):
        quantize(torch.randn(2, 48), "Q4_0", "x")


@needs_triton
@pytest.mark.parametrize("t", [1, 3])
def test_linear_over_mixed_formats(t):
    """Q4_K_M-style fused q/k/v: Q4_K rows over Q6_K rows, one matmul per format, plus a slice
    across the boundary (the next layer's query rows for prefetch)."""
    from lcrun.kernels.quant.linear import linear
    from lcrun.kernels.quant.weight import row_slice
    k = 256
    parts = [("Q4_K", 12), ("Q4_K", 4), ("Q6_K", 4)]
    raws = [gguf_blocks(fmt, n, k, seed=i) for i, (fmt, n) in enumerate(parts)]
    fused = cat_rows([QuantWeight.from_gguf(fmt, raw, n, k).to(DEVICE) for (fmt, n), raw in zip(parts, raws)])
    assert isinstance(fused, RowConcat) and fused.shape == (20, k)
    dense = torch.cat([reference(fmt, raw, n, k) for (fmt, n), raw in zip(parts, raws)])
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(0))
    for backend in ("triton", "torch"):
        torch.testing.assert_close(linear(x.to(DEVICE), fused, backend=backend).cpu(), x @ dense.T, rtol=1e-4, atol=1e-4)
        part = row_slice(fused, 10, 18)
        torch.testing.assert_close(linear(x.to(DEVICE), part, backend=backend).cpu(), x @ dense[10:18].T,
                                   rtol=1e-4, atol=1e-4)


_COMPILE_SM90 = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lcrun.kernels.quant import kernels as K
ptr = {"qs": "*u8", "d": "*fp16", "m": "*fp16", "sc": "*u8", "mn": "*u8", "qh": "*u8"}
for fmt in range(6):
    planes = {**ptr, **({"qs": "*i8"} if fmt == 0 else {}), **({"sc": "*i8"} if fmt == 5 else {})}
    gemv = {"x": "*bf16", **planes, "out": "*fp32", "N": "i32", "K": "i32", "QS_STRIDE": "i32",
            "PAIRS_PER_SPLIT": "i32", "FMT": "constexpr", "BLOCK_N": "constexpr", "BLOCK_P": "constexpr"}
    deq = {**planes, "out": "*bf16", "N": "i32", "K": "i32", "QS_STRIDE": "i32", "FMT": "constexpr",
           "BLOCK_N": "constexpr", "BLOCK_P": "constexpr"}
    for fn, sig in ((K._qgemv_kernel, gemv), (K._dequant_kernel, deq)):
        src = ASTSource(fn, sig, constexprs={"FMT": fmt, "BLOCK_N": 16, "BLOCK_P": 256})
        assert "cubin" in triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm
print("ok")
"""


def test_kernels_compile_for_sm90():
    """The compiled (not interpreted) path: every format's kernels go through Triton's CUDA
    pipeline to a cubin for sm_90 (needs Triton's bundled ptxas; no GPU)."""
    import subprocess
    import sys
    pytest.importorskip("triton.backends.nvidia")
    res = subprocess.run([sys.executable, "-c", _COMPILE_SM90], capture_output=True, text=True, timeout=600,
                         cwd=str(Path(__file__).resolve().parents[1]))
    if "ptxas" in res.stderr and "not found" in res.stderr:
        pytest.skip("no ptxas in this Triton install")
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
