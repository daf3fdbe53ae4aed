"""One torch implementation of Llama-family decoders (Llama 2/3.x, Mistral, Qwen2, SmolLM2).

Batch size 1. q/k/v and gate/up projections are fused into one matmul each: decode is bound by
streaming weights, and one larger GEMV beats three small launches. Attention goes through the
cache object (``lcrun.runtime.kv_cache``), so dense, paged and tiered caches share this code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from lcrun.profiling.ranges import named_range
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
        x = F.embedding(input_ids, self.embed)
        for i, lw in enumerate(self.layers):
            x = self._layer(i, lw, x, cache)
        cache.end_forward()
        if not all_logits:
            x = x[-1:]
        with named_range("lm_head"):
            return F.linear(rms_norm(x, self.final_norm, cfg.rms_eps), self.lm_head).float()

    def _layer(self, i: int, lw: LayerWeights, x: torch.Tensor, cache: AttentionCache) -> torch.Tensor:
        cfg, t = self.cfg, x.shape[0]
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # Named ranges split a profiled step (lcrun profile); without a profiler they are no-ops.
        with named_range("dense"):
            h = rms_norm(x, lw.attn_norm, cfg.rms_eps)
            q, k, v = F.linear(h, lw.wqkv, lw.bqkv).split((hq * d, hkv * d, hkv * d), dim=-1)
        with named_range("attention"):
            attn = cache.attend(i, q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d))
        with named_range("dense"):
            x = x + F.linear(attn.reshape(t, hq * d), lw.wo, lw.bo)
            h = rms_norm(x, lw.mlp_norm, cfg.rms_eps)
            gate, up = F.linear(h, lw.w_gate_up).chunk(2, dim=-1)
            return x + F.linear(F.silu(gate) * up, lw.w_down)

    @torch.inference_mode()
    def forward_layerwise(self, input_ids: torch.Tensor, cache, chunk: int,
                          progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Prefill layer-major for caches with ``layerwise_prefill`` (the tiered store): every chunk
        of ``input_ids`` passes layer 0, then layer 1, ... Each layer's K/V then needs the GPU only
        once per prompt instead of once per chunk. The hidden states of all T tokens are kept
        between layers (in page-cache memory when the cache lends it). progress(done, total) is
        called per layer in token-layer units scaled to tokens. Returns fp32 logits (1, vocab)."""
        cfg, t = self.cfg, input_ids.shape[0]
        positions = torch.arange(cache.length, cache.length + t, device=self.device)
        cache.begin_layerwise(positions)
        x = cache.prefill_buffer((t, cfg.hidden_size), self.dtype)
        if x is None:
            # Beyond what the page cache lends (e.g. 4 GiB of hidden states at 512K for an 8B
            # model): keep them in pinned host memory and move each chunk in and out per layer,
            # in stream order (about 2 * T * hidden * 2 bytes per layer over PCIe).
            x = torch.empty((t, cfg.hidden_size), dtype=self.dtype, pin_memory=self.device.type == "cuda")
        on_host = x.device != self.device
        for c0 in range(0, t, chunk):
            x[c0:c0 + chunk].copy_(F.embedding(input_ids[c0:c0 + chunk], self.embed), non_blocking=on_host)
        n_layers = len(self.layers)
        for i, lw in enumerate(self.layers):
            for c0 in range(0, t, chunk):
                xs = x[c0:c0 + chunk].to(self.device, non_blocking=True) if on_host else x[c0:c0 + chunk]
                x[c0:c0 + chunk].copy_(self._layer(i, lw, xs, cache), non_blocking=on_host)
            if progress is not None:
                progress(t * (i + 1) // n_layers, t)
        if on_host and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the last chunk's copy has landed
        last = x[-1:].to(self.device).clone()  # the buffer may be page-cache memory, reused once decode starts
        cache.end_forward()
        return F.linear(rms_norm(last, self.final_norm, cfg.rms_eps), self.lm_head).float()
