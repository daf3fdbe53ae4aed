"""Quantized weights as the model holds them: ``QuantWeight`` (one format, planes of
lcrun.kernels.quant.formats) and ``RowConcat`` (rows of weights of different formats stacked,
e.g. a Q4_K_M file's Q4_K q/k rows over its Q6_K v rows)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lcrun.kernels.quant.formats import FORMATS, dequantize_planes, plane_shapes, split_blocks


@dataclass
class QuantWeight:
    """An (N, K) weight (torch.nn.Linear layout: N outputs, K inputs) in one GGUF format."""
    fmt: str
    shape: tuple[int, int]
    planes: dict[str, torch.Tensor]

    def __post_init__(self):
        n, k = self.shape
        want = plane_shapes(self.fmt, n, k)
        if set(want) != set(self.planes) or any(tuple(self.planes[p].shape) != s or self.planes[p].dtype != dt
                                                for p, (s, dt) in want.items()):
            got = {p: (tuple(t.shape), t.dtype) for p, t in self.planes.items()}
            raise ValueError(f"{self.fmt} planes of a {n}x{k} weight must be {want}, got {got}")

    @classmethod
    def from_gguf(cls, fmt: str, raw: np.ndarray | torch.Tensor, n: int, k: int) -> "QuantWeight":
        return cls(fmt, (n, k), split_blocks(fmt, raw, n, k))

    @property
    def device(self) -> torch.device:
        return self.planes["qs"].device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.planes.values())

    def to(self, device: torch.device) -> "QuantWeight":
        return QuantWeight(self.fmt, self.shape, {p: t.to(device).contiguous() for p, t in self.planes.items()})

    def rows(self, start: int, stop: int) -> "QuantWeight":
        """Rows start..stop-1 (views of the planes)."""
        return QuantWeight(self.fmt, (stop - start, self.shape[1]), {p: t[start:stop] for p, t in self.planes.items()})

    def take_rows(self, ids: torch.Tensor) -> "QuantWeight":
        """The rows ``ids`` (int64, any device the planes are on), e.g. the embeddings of some tokens."""
        return QuantWeight(self.fmt, (ids.numel(), self.shape[1]),
                           {p: t.index_select(0, ids.reshape(-1)) for p, t in self.planes.items()})

    def dequantize_reference(self) -> torch.Tensor:
        """fp32 (N, K), plain torch (lcrun.kernels.quant.formats.dequantize_planes)."""
        return dequantize_planes(self.fmt, self.planes)

    @property
    def block(self) -> int:
        return FORMATS[self.fmt].block


@dataclass
class RowConcat:
    """Weights stacked by rows whose formats differ: a linear is one matmul per part, outputs
    concatenated (one fused matmul needs one format)."""
    parts: list[QuantWeight | torch.Tensor]

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(p.shape[0] for p in self.parts), self.parts[0].shape[1])

    @property
    def nbytes(self) -> int:
        return sum(weight_nbytes(p) for p in self.parts)

    def to(self, device: torch.device) -> "RowConcat":
        return RowConcat([p.to(device).contiguous() if isinstance(p, torch.Tensor) else p.to(device)
                          for p in self.parts])

    def rows(self, start: int, stop: int) -> "QuantWeight | torch.Tensor | RowConcat":
        out, base = [], 0
        for p in self.parts:
            lo, hi = max(start, base), min(stop, base + p.shape[0])
            if lo < hi:
                out.append(row_slice(p, lo - base, hi - base))
            base += p.shape[0]
        return out[0] if len(out) == 1 else RowConcat(out)


Weight = torch.Tensor | QuantWeight | RowConcat


def weight_nbytes(w: Weight) -> int:
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    return w.nbytes


def weight_format(w: Weight) -> str:
    """'bfloat16' (a tensor's dtype), 'Q4_0' (a QuantWeight's format) or 'Q4_K+Q6_K' (a RowConcat's)."""
    if isinstance(w, torch.Tensor):
        return str(w.dtype).removeprefix("torch.")
    if isinstance(w, QuantWeight):
        return w.fmt
    return "+".join(dict.fromkeys(weight_format(p) for p in w.parts))


def row_slice(w: Weight, start: int, stop: int) -> Weight:
    return w[start:stop] if isinstance(w, torch.Tensor) else w.rows(start, stop)


def cat_rows(parts: list[Weight]) -> Weight:
    """Stack weights by rows: one tensor or QuantWeight where all parts share a dtype/format,
    else a RowConcat of runs of equal formats (torch tensors are one 'format' per dtype)."""
    def kind(p: Weight):
        return p.dtype if isinstance(p, torch.Tensor) else p.fmt

    runs: list[list[Weight]] = []
    for p in parts:
        if runs and kind(runs[-1][-1]) == kind(p):
            runs[-1].append(p)
        else:
            runs.append([p])
    merged = [_cat_same(run) for run in runs]
    return merged[0] if len(merged) == 1 else RowConcat(merged)


def _cat_same(run: list[Weight]) -> Weight:
    if len(run) == 1:
        return run[0]
    if isinstance(run[0], torch.Tensor):
        return torch.cat(run)
    return QuantWeight(run[0].fmt, (sum(p.shape[0] for p in run), run[0].shape[1]),
                       {name: torch.cat([p.planes[name] for p in run]) for name in run[0].planes})
