"""One torch implementation of Llama-family decoders (Llama 2/3.x, Mistral, Qwen2, SmolLM2).

Batch size 1. q/k/v and gate/up projections are fused into one matmul each: decode is bound by
streaming weights, and one larger GEMV beats three small launches. Attention goes through the
cache object (``lcrun.runtime.kv_cache``), so dense, paged and tiered caches share this code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lcrun.runtime.kv_cache import AttentionCache
from lcrun.runtime.model_config import ModelConfig


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor   # (hidden,)
    wqkv: torch.Tensor        # ((Hq + 2 Hkv) * D, hidden)
    bqkv: torch.Tensor | None
    wo: torch.Tensor          # (hidden, Hq * D)
    bo: torch.Tensor | None
    mlp_norm: torch.Tensor    # (hidden,)
    w_gate_up: torch.Tensor   # (2 * inter, hidden)
    w_down: torch.Tensor      # (hidden, inter)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # fp32 statistics, then the weight applied in the activation dtype: as HF's LlamaRMSNorm.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class LlamaModel:
    def __init__(self, cfg: ModelConfig, embed: torch.Tensor, layers: list[LayerWeights],
                 final_norm: torch.Tensor, lm_head: torch.Tensor):
        self.cfg = cfg
        self.embed = embed
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def weight_bytes(self) -> int:
        tensors = [self.embed, self.final_norm]
        if self.lm_head is not self.embed:
            tensors.append(self.lm_head)
        for lw in self.layers:
            tensors += [t for t in vars(lw).values() if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: AttentionCache, all_logits: bool = False,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (T,) int64 on the model's device, continuing what ``cache`` holds.
        positions: (T,) int64 device tensor, default cache.length onwards (a captured decode step
        passes a static tensor it refills before each replay).
        Returns fp32 logits (T, vocab) if ``all_logits`` else (1, vocab) for the last token."""
        cfg = self.cfg
        t = input_ids.shape[0]
        if positions is None:
            positions = torch.arange(cache.length, cache.length + t, device=self.device)
        cache.begin_forward(positions)
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        x = F.embedding(input_ids, self.embed)
        for i, lw in enumerate(self.layers):
            h = rms_norm(x, lw.attn_norm, cfg.rms_eps)
            qkv = F.linear(h, lw.wqkv, lw.bqkv)
            q, k, v = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)
            attn = cache.attend(i, q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d))
            x = x + F.linear(attn.reshape(t, hq * d), lw.wo, lw.bo)
            h = rms_norm(x, lw.mlp_norm, cfg.rms_eps)
            gate, up = F.linear(h, lw.w_gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, lw.w_down)
        cache.end_forward()
        if not all_logits:
            x = x[-1:]
        return F.linear(rms_norm(x, self.final_norm, cfg.rms_eps), self.lm_head).float()
