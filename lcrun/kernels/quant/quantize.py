"""Weights into quantized formats: dense tensors quantized by the ``gguf`` package's quantizers
(llama.cpp's reference rounding), and random quantized weights of real shapes for benchmarks."""
from __future__ import annotations

import functools

import numpy as np
import torch
from gguf.quants import quantize as gguf_quantize

from lcrun.errors import ConfigError
from lcrun.kernels.quant.formats import FORMATS, plane_shapes
from lcrun.kernels.quant.weight import QuantWeight

# --weights values that quantize, and their formats
WEIGHT_FORMATS = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K"}


def check_shape(fmt: str, name: str, n: int, k: int) -> None:
    block = FORMATS[fmt].block
    if k % block:
        raise ConfigError(f"{name} has rows of {k} elements, not whole {fmt} blocks of {block}: "
                          f"use --weights q8_0 or q4_0 (32-element blocks) or bf16")


@functools.cache
def can_quantize(fmt: str) -> bool:
    """Whether the gguf package has a quantizer for ``fmt`` (its K-quants only dequantize)."""
    try:
        gguf_quantize(np.zeros((1, FORMATS[fmt].block), dtype=np.float32), FORMATS[fmt].ggml)
    except NotImplementedError:
        return False
    return True


def check_quantizable(fmt: str, what: str) -> None:
    """Refuse making ``fmt`` weights from dense ones where the gguf package has no quantizer."""
    if not can_quantize(fmt):
        raise ConfigError(f"--weights {fmt.lower()}: the gguf package has no {fmt} quantizer, so lcrun cannot make "
                          f"{fmt} weights from {what}: load a {fmt} GGUF file (e.g. a Q4_K_M) with --weights auto, "
                          "or use --weights q4_0 or q8_0")


def quantize(w: torch.Tensor, fmt: str, name: str = "a weight") -> QuantWeight:
    """A dense (N, K) weight (any float dtype, any device) -> QuantWeight on the CPU, rounded as
    llama.cpp's reference quantizer (gguf.quants.quantize)."""
    n, k = w.shape
    check_shape(fmt, name, n, k)
    check_quantizable(fmt, name)
    raw = gguf_quantize(w.detach().float().cpu().numpy(), FORMATS[fmt].ggml)
    return QuantWeight.from_gguf(fmt, raw, n, k)


def random_quant(fmt: str, n: int, k: int, device: torch.device, gen: torch.Generator, std: float = 0.02,
                 name: str = "a weight") -> QuantWeight:
    """Random (n, k) weights of ``fmt`` made on ``device``: random quants with scales chosen so
    the values have about ``std`` and mean 0 (speed does not depend on values; quantizing random
    floats of an 8B model on the CPU would take minutes)."""
    check_shape(fmt, name, n, k)
    shapes = plane_shapes(fmt, n, k)

    def rand(p: str, lo: int, hi: int) -> torch.Tensor:
        shape, dtype = shapes[p]
        return torch.randint(lo, hi, shape, generator=gen, device=device, dtype=dtype)

    def const(p: str, value: float) -> torch.Tensor:
        shape, dtype = shapes[p]
        return torch.full(shape, value, device=device, dtype=dtype)

    # quants are uniform: std of q is levels/sqrt(12), and the offsets remove its mean (levels-1)/2
    levels = {"Q8_0": 256, "Q4_0": 16, "Q4_1": 16, "Q4_K": 16, "Q5_K": 32, "Q6_K": 64}[fmt]
    q_std, mid = levels / 12 ** 0.5, (levels - 1) / 2
    if fmt == "Q8_0":
        return QuantWeight(fmt, (n, k), {"qs": rand("qs", -128, 128), "d": const("d", std / q_std)})
    planes = {"qs": rand("qs", 0, 256)}
    if fmt in ("Q4_0", "Q4_1"):
        planes["d"] = const("d", std / q_std)
        if fmt == "Q4_1":
            planes["m"] = const("m", -mid * std / q_std)
    elif fmt == "Q6_K":  # int8 scales 1..63 (mean 32)
        planes.update(qh=rand("qh", 0, 256), sc=rand("sc", 1, 64), d=const("d", std / (q_std * 32)))
    else:  # Q4_K / Q5_K: w = d*sc*q - dmin*mn; dmin = d*levels/2 keeps mn = sc*mid/(levels/2) within 6 bits
        sc = rand("sc", 1, 64)
        d = std / (q_std * 32)
        planes.update(sc=sc, mn=torch.round(sc.float() * mid / (levels / 2)).to(torch.uint8),
                      d=const("d", d), m=const("m", d * levels / 2))
        if fmt == "Q5_K":
            planes["qh"] = rand("qh", 0, 256)
    return QuantWeight(fmt, (n, k), planes)

