"""GGUF block formats as lcrun keeps them on the device: each GGUF block split into planes.

A weight (N, K) of one format is a few contiguous row-major planes, one row per output row. The
planes hold exactly the GGUF block's fields, regrouped so a kernel reads each field with plain
aligned loads (a GGUF block of 18 or 34 bytes would leave fp16 scales unaligned):

  ``qs``  4-bit formats: (N, K/2) uint8. For each 32-element group g, bytes 16g..16g+15; byte j
          holds element 32g+j in its low nibble and element 32g+16+j in its high one (Q4_0's
          own order; Q4_K/Q5_K/Q6_K nibbles are reordered into it). Q8_0: (N, K) int8.
  ``d``   fp16 scale: per 32 elements (Q8_0, Q4_0, Q4_1) or per 256 (K-quants): (N, K/32|K/256).
  ``m``   fp16 offset: Q4_1 per 32 (added), Q4_K/Q5_K ``dmin`` per 256 (subtracted times ``mn``).
  ``sc``  Q4_K/Q5_K 6-bit sub-block scales (N, K/32) uint8 (unpacked from GGUF's 12 bytes per 256:
          4 bytes more per super-block, 3%); Q6_K int8 scales per 16 elements (N, K/16).
  ``mn``  Q4_K/Q5_K 6-bit sub-block mins (N, K/32) uint8.
  ``qh``  high bits: Q5_K bit e%8 of byte e//8 (N, K/8); Q6_K bits 2(e%4)..+1 of byte e//4 (N, K/4).

Element e of a row dequantizes to:
  Q8_0 d[e/32]*q   Q4_0 d[e/32]*(q-8)   Q4_1 d[e/32]*q + m[e/32]
  Q4_K/Q5_K d[e/256]*sc[e/32]*q - m[e/256]*mn[e/32]   (Q5_K: q = nibble | hbit << 4)
  Q6_K d[e/256]*sc[e/16]*(q-32)   (q = nibble | 2 high bits << 4)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


@dataclass(frozen=True)
class QFormat:
    name: str            # lcrun's and GGUF's name: "Q4_0"
    code: int            # the kernels' FMT constant
    block: int           # elements per GGUF block
    block_bytes: int     # bytes per GGUF block
    ggml: GGMLQuantizationType

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block


def _fmt(name: str, code: int) -> QFormat:
    ggml = GGMLQuantizationType[name]
    block, nbytes = GGML_QUANT_SIZES[ggml]
    return QFormat(name, code, block, nbytes, ggml)


FORMATS: dict[str, QFormat] = {f.name: f for f in (
    _fmt("Q8_0", 0), _fmt("Q4_0", 1), _fmt("Q4_1", 2), _fmt("Q4_K", 3), _fmt("Q5_K", 4), _fmt("Q6_K", 5))}
BY_GGML = {f.ggml: f for f in FORMATS.values()}
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")


def plane_shapes(fmt: str, n: int, k: int) -> dict[str, tuple[tuple[int, int], torch.dtype]]:
    """The planes of an (n, k) weight of ``fmt``: name -> (shape, dtype)."""
    u8, f16 = torch.uint8, torch.float16
    if fmt == "Q8_0":
        return {"qs": ((n, k), torch.int8), "d": ((n, k // 32), f16)}
    shapes = {"qs": ((n, k // 2), u8)}
    if fmt in ("Q4_0", "Q4_1"):
        shapes["d"] = ((n, k // 32), f16)
        if fmt == "Q4_1":
            shapes["m"] = ((n, k // 32), f16)
        return shapes
    shapes["d"] = ((n, k // 256), f16)
    if fmt == "Q6_K":
        shapes.update(sc=((n, k // 16), torch.int8), qh=((n, k // 4), u8))
        return shapes
    shapes.update(m=((n, k // 256), f16), sc=((n, k // 32), u8), mn=((n, k // 32), u8))
    if fmt == "Q5_K":
        shapes["qh"] = ((n, k // 8), u8)
    return shapes


def planes_nbytes(fmt: str, n: int, k: int) -> int:
    """Bytes of an (n, k) weight of ``fmt`` on the device."""
    return sum(a * b * dt.itemsize for (a, b), dt in plane_shapes(fmt, n, k).values())


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 (uint8) -> the ``qs`` plane (N, K/2) in the 32-element group order."""
    g = q.reshape(q.shape[0], -1, 2, 16)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(q.shape[0], -1)


def unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """The ``qs`` plane (N, K/2) -> (N, K) values 0..15 (uint8); the inverse of pack_nibbles."""
    g = qs.reshape(qs.shape[0], -1, 1, 16)
    return torch.cat([g & 15, g >> 4], dim=2).reshape(qs.shape[0], -1)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) values < 2**bits (uint8) -> (N, K*bits/8): element e at bits ``bits*(e % per)`` of
    byte ``e // per``, per = 8 // bits."""
    per = 8 // bits
    g = q.reshape(q.shape[0], -1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32, device=q.device) * bits
    return (g << shifts).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of pack_bits: (N, K*bits/8) -> (N, K) uint8."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
    return ((packed[..., None] >> shifts) & ((1 << bits) - 1)).reshape(packed.shape[0], -1)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 little-endian bytes -> (...) fp16."""
    return b.contiguous().view(torch.float16)[..., 0]


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF's 12 packed bytes of eight 6-bit scales and mins (R, 12) -> (R, 8), (R, 8) uint8."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def split_blocks(fmt: str, raw: torch.Tensor | np.ndarray, n: int, k: int) -> dict[str, torch.Tensor]:
    """GGUF blocks of an (n, k) weight (n rows of k/block blocks, uint8, any shape holding n * bytes
    per row) -> the planes documented above (CPU tensors)."""
    f = FORMATS[fmt]
    if k % f.block:
        raise ValueError(f"a {fmt} row of {k} elements is not whole {f.block}-element blocks")
    if isinstance(raw, np.ndarray):  # a copy: raw may be a read-only memmap of the file
        raw = torch.from_numpy(np.array(raw, dtype=np.uint8))
    b = raw.contiguous().view(torch.uint8).reshape(n * (k // f.block), f.block_bytes)
    rows = lambda t: t.reshape(n, -1).contiguous()  # noqa: E731
    if fmt == "Q8_0":
        return {"qs": rows(b[:, 2:].view(torch.int8)), "d": rows(_f16(b[:, 0:2]))}
    if fmt == "Q4_0":
        return {"qs": rows(b[:, 2:]), "d": rows(_f16(b[:, 0:2]))}
    if fmt == "Q4_1":
        return {"qs": rows(b[:, 4:]), "d": rows(_f16(b[:, 0:2])), "m": rows(_f16(b[:, 2:4]))}
    nb = b.shape[0]
    if fmt == "Q6_K":
        ql, qh, sc = b[:, :128], b[:, 128:192], b[:, 192:208]
        low = torch.stack([ql.reshape(nb, 2, 64) & 15, ql.reshape(nb, 2, 64) >> 4], dim=2)  # (nb, half, nib, 64)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
        high = (qh.reshape(nb, 2, 1, 32) >> shifts[None, None, :, None]) & 3      # (nb, half, 4, 32)
        return {"qs": pack_nibbles(rows(low)), "qh": pack_bits(rows(high), 2),
                "sc": rows(sc.view(torch.int8)), "d": rows(_f16(b[:, 208:210]))}
    sc, mn = _k_scale_min(b[:, 4:16])
    planes = {"d": rows(_f16(b[:, 0:2])), "m": rows(_f16(b[:, 2:4])), "sc": rows(sc), "mn": rows(mn)}
    qs = b[:, 16:144] if fmt == "Q4_K" else b[:, 48:176]
    # GGUF K-quant nibbles: 32 bytes per 64 elements, low nibble = first 32, high = next 32
    q = torch.stack([qs.reshape(nb, 4, 32) & 15, qs.reshape(nb, 4, 32) >> 4], dim=2)
    planes["qs"] = pack_nibbles(rows(q))
    if fmt == "Q5_K":
        qh = b[:, 16:48]
        high = (qh.reshape(nb, 1, 32) >> torch.arange(8, dtype=torch.uint8)[None, :, None]) & 1  # bit i: sub-block i
        planes["qh"] = pack_bits(rows(high), 1)
    return planes


def dequantize_planes(fmt: str, planes: dict[str, torch.Tensor]) -> torch.Tensor:
    """Plain-torch reference: the planes of an (N, K) weight -> fp32 (N, K) (any device)."""
    p = {name: t for name, t in planes.items()}
    n = p["qs"].shape[0]

    def per(t: torch.Tensor, group: int) -> torch.Tensor:  # (N, K/group) -> (N, K)
        return t.float().repeat_interleave(group, dim=1)

    if fmt == "Q8_0":
        return per(p["d"], 32) * p["qs"].float()
    q = unpack_nibbles(p["qs"]).to(torch.int32)
    if fmt == "Q4_0":
        return per(p["d"], 32) * (q - 8).float()
    if fmt == "Q4_1":
        return per(p["d"], 32) * q.float() + per(p["m"], 32)
    if fmt == "Q6_K":
        q = q | (unpack_bits(p["qh"], 2).to(torch.int32) << 4)
        return (per(p["d"], 256) * per(p["sc"], 16)) * (q - 32).float()
    if fmt == "Q5_K":
        q = q | (unpack_bits(p["qh"], 1).to(torch.int32) << 4)
    assert fmt in ("Q4_K", "Q5_K"), fmt
    w = (per(p["d"], 256) * per(p["sc"], 32)) * q.float() - per(p["m"], 256) * per(p["mn"], 32)
    return w.reshape(n, -1)
