"""Rotary position embedding (HF 'rotate_half' layout) with default, linear and llama3 scaling."""
from __future__ import annotations

import math

import torch

from lcrun.kernels.fused_rope import rope_qk, rope_three
from lcrun.runtime.model_config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, shape (head_dim // 2,), float32, after the config's rope scaling."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class Rotary:
    """Applies RoPE at arbitrary integer positions; cos/sin are computed per call, never tabled,
    so a 1M-token context costs no table memory."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str):
        self.inv_freq = rope_inv_freq(cfg).to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) integer -> cos, sin: (T, 1, head_dim) in ``dtype``."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (T, H, D); cos/sin: (T, 1, D), or anything broadcastable (then plain torch).
        One fused launch on CUDA when x, cos, sin share a dtype (bit-identical to the torch code)."""
        return rope_qk(x, None, cos, sin)[0]

    @staticmethod
    def apply_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(apply(q, cos, sin), apply(k, cos, sin))`` in one launch on CUDA. q: (T, Hq, D),
        k: (T, Hkv, D), strided views allowed (last dim contiguous); cos/sin: (T, 1, D)."""
        return rope_qk(q, k, cos, sin)

    @staticmethod
    def apply_window(q: torch.Tensor, k: torch.Tensor, q_at: tuple[torch.Tensor, torch.Tensor],
                     k_at: tuple[torch.Tensor, torch.Tensor], score_at: tuple[torch.Tensor, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A window-position decode step (lcrun.runtime.positions): (q at ``q_at``, k at ``k_at``,
        q at ``score_at``) in one launch on CUDA. Shapes as ``apply_qk``; each pair (T, 1, D)."""
        return rope_three(q, k, q_at, k_at, score_at)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos_sin(positions, x.dtype)
        return self.apply(x, cos, sin)
