"""What every part of the tiered store shares: its sizes and selection settings (fixed at
construction), and which kernels move its pages."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lcrun.runtime.model_config import ModelConfig


@dataclass(frozen=True)
class TierConfig:
    cfg: ModelConfig
    capacity: int              # tokens
    device: torch.device
    dtype: torch.dtype         # the model's: tokens, staging and page abstracts
    page_size: int             # P tokens of one KV head of one layer, K and V
    budget: int                # tokens per KV head a decode step attends (sinks + window + top pages)
    sink_tokens: int
    window_tokens: int
    group_score: str           # how a GQA group's scores of a page combine: max | sum

    @property
    def max_pages(self) -> int:
        """Pages per KV head of one layer."""
        return -(-self.capacity // self.page_size)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def sm_scale(self) -> float:
        return 1.0 / math.sqrt(self.cfg.head_dim)

    def flats(self, pages: np.ndarray) -> np.ndarray:
        """Flat page ids h * max_pages + p of ``pages`` (1-D) for every KV head h, head-major."""
        return (np.arange(self.cfg.num_kv_heads)[:, None] * self.max_pages + pages[None, :]).ravel()


def tier_kernels(device: torch.device):
    """The tiered-store kernels (lcrun.kernels.tiered): Triton on CUDA (zero-copy host reads),
    their torch references elsewhere."""
    if device.type == "cuda":
        from lcrun.kernels import tiered as ops
    else:
        from lcrun.kernels import tiered_reference as ops
    return ops


def capturing() -> bool:
    """Whether this thread is capturing a CUDA graph (host work between steps must wait for a replay)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
