"""K/V of sliding-window layers (Gemma 3's local layers): each layer keeps only its last
``window`` tokens, in a ring of that many slots (the token at position p sits in slot p % window),
on the model's device. Never paged, never offloaded: its size does not depend on the context.

A decode step writes its slot and masks the ring from the device position alone, so it can be
captured as a CUDA graph. Attention is order-free once keys carry RoPE at their true positions,
so the ring is read as it lies. A prefill chunk attends to the up to window - 1 tokens before it
in the ring plus its own keys, under a causal sliding-window mask (as transformers' Gemma 3: a
query at p sees keys p - window + 1 .. p), then leaves its last ``window`` keys in the ring.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lcrun.runtime.kv_cache import AttentionCache, DenseCache, PagedDecode
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.rope import Rotary


class RingCache(AttentionCache):
    graph_safe_decode = True

    def __init__(self, cfg: ModelConfig, capacity: int, window: int, device, dtype, paged: bool | None = None):
        """cfg: the local layers' view (ModelConfig.local_view: their count and rope);
        capacity: the run's context (positions go that far); window: tokens each query sees;
        paged: decode with the flash-decoding kernel over pages of the ring (needs a window of
        whole DenseCache.DECODE_PAGE pages); None: on CUDA where the window allows."""
        super().__init__(cfg, capacity, device, dtype)
        if window < 1:
            raise ValueError(f"a sliding window of {window} tokens")
        self.window = window
        self.sm_scale = cfg.head_dim ** -0.5
        shape = (cfg.num_layers, cfg.num_kv_heads, window, cfg.head_dim)
        self.k = torch.zeros(shape, device=self.device, dtype=dtype)
        self.v = torch.zeros(shape, device=self.device, dtype=dtype)
        whole_pages = window % DenseCache.DECODE_PAGE == 0
        if paged and not whole_pages:
            raise ValueError(f"a window of {window} tokens is not whole pages of {DenseCache.DECODE_PAGE}")
        paged = (self.device.type == "cuda" and whole_pages) if paged is None else paged
        self._pages = PagedDecode(cfg.num_kv_heads, window // DenseCache.DECODE_PAGE, self.device) if paged else None
        self._slots = torch.arange(window, device=self.device)
        self._done = [0] * cfg.num_layers  # tokens of this forward each layer has taken (layer-major prefill)

    def begin_layerwise(self, positions: torch.Tensor) -> None:
        """A prompt prefilled layer-major (beside a tiered global cache): each layer then takes the
        prompt's chunks in order, and rotates each at its own slice of ``positions``."""
        self.begin_forward(positions)

    def _plan(self, positions: torch.Tensor) -> None:
        self._done = [0] * self.cfg.num_layers
        self._cos_sin = self.rotary.cos_sin(positions, self.dtype)
        if positions.numel() == 1:
            pos = positions[:1]
            self._slot = pos % self.window
            if self._pages is not None:
                self._pages.set_length(torch.clamp(pos + 1, max=self.window).to(torch.int32))
            else:
                self._valid = self._slots <= pos  # a prefix until the ring wraps, then every slot

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t, done = q.shape[0], self._done[layer]
        self._done[layer] += t
        cos, sin = (c[done:done + t] for c in self._cos_sin)
        q, k = Rotary.apply_qk(q, k, cos, sin)
        if self._pending == 1:
            return self._decode(layer, q, k, v)
        return self._prefill(layer, self.length + done, q, k, v)

    def _decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.k[layer].index_copy_(1, self._slot, k.transpose(0, 1))
        self.v[layer].index_copy_(1, self._slot, v.transpose(0, 1))
        if self._pages is not None:
            return self._pages.attend(q, self.k[layer], self.v[layer], self.sm_scale)
        hkv, g, d = self.cfg.num_kv_heads, self.cfg.gqa_group, self.cfg.head_dim
        rows = q.reshape(hkv, g, d)
        out = F.scaled_dot_product_attention(rows, self.k[layer], self.v[layer], attn_mask=self._valid[None, :],
                                             scale=self.sm_scale)
        return out.reshape(1, hkv * g, d)

    def _prefill(self, layer: int, start: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t, w = q.shape[0], self.window
        hkv, g, d = self.cfg.num_kv_heads, self.cfg.gqa_group, self.cfg.head_dim
        dev = self.device
        past = torch.arange(start - min(start, w - 1), start, device=dev)
        new = torch.arange(start, start + t, device=dev)
        keys = torch.cat([self.k[layer][:, past % w], k.transpose(0, 1)], dim=1)
        values = torch.cat([self.v[layer][:, past % w], v.transpose(0, 1)], dim=1)
        key_pos = torch.cat([past, new])
        mask = (key_pos[None, :] <= new[:, None]) & (key_pos[None, :] > new[:, None] - w)
        # Each GQA group's query heads folded into rows against its one KV head, as DenseCache.
        rows = q.view(t, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * t, d)
        out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask.repeat(g, 1), scale=self.sm_scale)
        kept = new[-w:]  # read above before these writes: they may overwrite what early queries saw
        self.k[layer][:, kept % w] = keys[:, -kept.numel():]
        self.v[layer][:, kept % w] = values[:, -kept.numel():]
        return out.view(hkv, g, t, d).permute(2, 0, 1, 3).reshape(t, hkv * g, d)

    def truncate(self, length: int) -> None:
        """Forgetting the last token is free; forgetting more, once the ring has wrapped, would need
        tokens it overwrote: then it forgets everything (length 0) and the caller prefills again."""
        if length < self.length - 1 and self.length > self.window:
            self.length = 0
        else:
            self.length = min(self.length, length)

    def memory_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    # -- saved contexts: the ring as it lies (slot p % window holds position p, for the same length)
    def snapshot_layout(self) -> dict:
        return {"cache": "ring", "dtype": str(self.dtype), "window": self.window}

    def export_layer(self, layer: int) -> dict[str, torch.Tensor]:
        return {"k": self.k[layer], "v": self.v[layer]}  # (Hkv, window, D) post-RoPE

    def import_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        self.k[layer].copy_(tensors["k"])
        self.v[layer].copy_(tensors["v"])
