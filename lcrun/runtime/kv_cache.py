"""The attention seam: the model hands each layer's new q/k/v to a cache object, which stores
K/V and returns the attention output. Dense, paged top-k and tiered caches all sit behind it.

Contract for one forward pass over T new tokens at positions ``pos`` (batch size 1):
    cache.begin_forward(pos)             # once: plan per-step metadata (selection, slots, masks)
    out = cache.attend(layer, q, k, v)   # every layer: q (T, Hq, D), k/v (T, Hkv, D), *before* RoPE
    cache.end_forward()                  # once: the T tokens now count as cached
Positions are handled by the cache (it owns the Rotary), so a cache may keep keys before RoPE and
place attended tokens at positions of its choosing (extrapolation past the trained window).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lcrun.errors import ConfigError, ContextOverflowError
from lcrun.kernels.attention_lse import RunningAttention, attention_with_lse
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.rope import Rotary


class AttentionCache(ABC):
    def __init__(self, cfg: ModelConfig, capacity: int, device: torch.device, dtype: torch.dtype):
        self.cfg = cfg
        self.capacity = capacity
        self.device = torch.device(device)
        self.dtype = dtype
        self.rotary = Rotary(cfg, self.device)
        self.length = 0  # tokens cached and complete in every layer
        self._pending = 0

    def begin_forward(self, positions: torch.Tensor) -> None:
        n = positions.numel()
        if self.length + n > self.capacity:
            raise ContextOverflowError(
                f"{self.length + n} tokens do not fit the context of {self.capacity} tokens "
                f"(over by {self.length + n - self.capacity}): raise --ctx or shorten the input")
        self._pending = n
        self._positions = positions
        self._plan(positions)

    # -- what the model, the generator and the decode graph may ask of a cache ----------------
    graph_safe_decode = False  # a decode step reads its position and lengths from device tensors only
    layerwise_prefill = False  # prompts run layer-major: begin_layerwise, then the model's forward_layerwise

    def moves_queries(self, end: int) -> bool:
        """Whether the queries of a prefill ending at token ``end`` (or of the decode step at
        ``end - 1``) sit at window positions (lcrun.runtime.positions); the default never moves."""
        return False

    def begin_prefill(self, end: int) -> None:
        """A prompt is about to be prefilled up to token ``end`` (in one forward or more; its last
        token may follow as a one-token step). Caches that place queries by where the sequence
        goes read it (lcrun.runtime.positions); the default ignores it."""

    def shares_prefill_selection(self, end: int) -> bool:
        """Whether a prefill ending at token ``end`` shares page selections among blocks of queries
        (then the Generator runs the prompt's last token alone, as a decode step)."""
        return False

    def decode_graph_key(self) -> object:
        """Decode steps with equal keys replay one captured graph; a new key is captured anew."""
        return None

    def before_capture(self) -> None:
        """Settle what eager decode steps measured before a step is captured as a graph."""

    def wants_lookahead(self, layer: int) -> bool:
        """Whether the model should call ``lookahead`` before layer ``layer``'s attention (a
        prefetcher that predicts the next layer's query from this layer's input)."""
        return False

    def lookahead(self, layer: int, predict_next_query: Callable[[], torch.Tensor]) -> None:
        """predict_next_query() -> (1, Hq, D) pre-RoPE query of layer ``layer + 1`` computed from
        layer ``layer``'s input hidden state (InfiniGen's predictor). Default: unused."""

    def begin_replay(self, n: int) -> None:
        """Host bookkeeping of a forward whose device work is a replayed CUDA graph."""
        if self.length + n > self.capacity:
            raise ContextOverflowError(f"the context of {self.capacity} tokens is full")
        self._pending = n

    def end_forward(self) -> None:
        self.length += self._pending
        self._pending = 0

    def settle_decode_step(self) -> bool:
        """Called after every one-token forward (a decode step, eager or replayed), once its result
        is final on the host side. True means the step read pages that arrived late and must run
        again: the cache has already forgotten the step's token (``length`` is one less) and made
        those pages readable, so the caller runs the same token at the same position again and
        then settles again. False (the default): keep the step's result."""
        return False

    def reset(self) -> None:
        self.truncate(0)

    def close(self) -> None:
        """Release what the cache holds beyond its tensors (threads, pinned host pools, KV files
        under --kv-dir); the default holds nothing more. The cache is not used after."""

    @abstractmethod
    def _plan(self, positions: torch.Tensor) -> None:
        """Build the metadata every layer of this forward shares."""

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (T, Hq, D), k/v: (T, Hkv, D) pre-RoPE -> (T, Hq, D)."""

    @abstractmethod
    def truncate(self, length: int) -> None:
        """Forget every token from ``length`` on (for editing a conversation). A cache may forget
        more than asked (a ring of sliding-window layers cannot take back what it overwrote):
        callers read ``length`` after."""

    def memory_bytes(self) -> int:
        return 0

    def report(self) -> dict[str, Any]:
        """Counters of the pages' tiers since the cache was made (hits, bytes moved, NVMe pages that
        arrived late or were skipped); synchronises: call between runs. Empty: no tiers."""
        return {}

    # -- saved contexts (lcrun.runtime.context_file): one layer at a time, so a load streams -----
    def snapshot_layout(self) -> dict[str, Any]:
        """What a saved context must match to load into this cache (its kind, page size, dtypes)."""
        raise ConfigError(f"{type(self).__name__} cannot save or load contexts: use --attention dense or topk")

    def begin_export(self) -> None:
        """Before ``export_layer`` of every layer in order (then ``end_export``, also on failure)."""

    def end_export(self) -> None:
        pass

    def export_layer(self, layer: int) -> dict[str, torch.Tensor]:
        """The named tensors that restore ``layer`` for the ``length`` tokens cached."""
        raise ConfigError(f"{type(self).__name__} cannot save contexts")

    def begin_import(self, length: int) -> None:
        """Forget the cache; ``import_layer`` for every layer then fills ``length`` tokens."""
        self.truncate(0)

    def import_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        raise ConfigError(f"{type(self).__name__} cannot load contexts")

    def end_import(self, length: int) -> None:
        self.length = length


def _chunk_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, g: int,
                     sm_scale: float) -> torch.Tensor:
    """q: (T, Hq, D) post-RoPE at positions start..start+T-1; keys/values: (Hkv, start+T, D)."""
    t, _, d = q.shape
    hkv = keys.shape[0]
    own_k = keys[:, start:].repeat_interleave(g, 0)
    own_v = values[:, start:].repeat_interleave(g, 0)
    o, lse = attention_with_lse(q.transpose(0, 1).contiguous(), own_k, own_v, True, sm_scale)
    if start == 0:
        return o.transpose(0, 1)
    acc = RunningAttention(o.view(hkv, g, t, d).reshape(hkv, g * t, d), lse.view(hkv, g * t))
    rows = q.view(t, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * t, d)
    acc.add(*attention_with_lse(rows, keys[:, :start], values[:, :start], False, sm_scale))
    return acc.result(q.dtype).view(hkv, g, t, d).permute(2, 0, 1, 3).reshape(t, hkv * g, d)


class PagedDecode:
    """Flash decoding of one query over a contiguous per-layer buffer (Hkv, pages * P, D) read as
    pages of P = DenseCache.DECODE_PAGE tokens, its first ``seq_len`` tokens valid. The length is a
    device tensor, so a step using it can be captured as a CUDA graph. CUDA only."""

    def __init__(self, num_kv_heads: int, num_pages: int, device: torch.device):
        from lcrun.kernels import kernel_backend
        self._decode_attention = kernel_backend(device, "auto").sparse_decode_attention
        P = DenseCache.DECODE_PAGE
        self._slots = torch.arange(num_kv_heads * num_pages, device=device, dtype=torch.int32).view(num_kv_heads, -1)
        self._page_starts = torch.arange(num_pages, device=device, dtype=torch.int32) * P
        self._lens = torch.zeros((num_kv_heads, num_pages), device=device, dtype=torch.int32)
        self._n_pages = torch.zeros(1, device=device, dtype=torch.int32)

    def set_length(self, seq_len: torch.Tensor) -> None:
        """seq_len: (1,) int32 device tensor, the valid tokens (tokens per page follow from it)."""
        P = DenseCache.DECODE_PAGE
        self._lens.copy_(torch.clamp(seq_len - self._page_starts, 0, P).expand_as(self._lens))
        self._n_pages.copy_(torch.div(seq_len + P - 1, P, rounding_mode="floor"))

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sm_scale: float) -> torch.Tensor:
        """q: (1, Hq, D) post-RoPE; keys/values: (Hkv, pages * P, D) -> (1, Hq, D)."""
        P, d = DenseCache.DECODE_PAGE, keys.shape[-1]
        out = self._decode_attention(q[0].contiguous(), keys.view(-1, P, d), values.view(-1, P, d),
                                     self._slots, self._lens, sm_scale, num_entries=self._n_pages)
        return out[None]


class DenseCache(AttentionCache):
    """Every token's post-RoPE K/V in one preallocated buffer per layer; attention over all of it.

    Decode on a GPU reads the buffer as pages of DECODE_PAGE tokens with flash decoding (the
    sparse-decode kernel given every page), with the position and lengths in device tensors: the
    step can be captured as a CUDA graph like the top-k caches', so dense and top-k decode are
    compared on the same footing."""

    DECODE_PAGE = 32
    graph_safe_decode = True

    def __init__(self, cfg: ModelConfig, capacity: int, device, dtype):
        super().__init__(cfg, capacity, device, dtype)
        self.sm_scale = cfg.head_dim ** -0.5
        P = self.DECODE_PAGE
        self.num_pages = -(-capacity // P)
        # Rounded up to whole pages so each layer's buffer views as (Hkv * pages, P, D).
        shape = (cfg.num_layers, cfg.num_kv_heads, self.num_pages * P, cfg.head_dim)
        self.k = torch.empty(shape, device=self.device, dtype=dtype)
        self.v = torch.empty(shape, device=self.device, dtype=dtype)
        self._pages = PagedDecode(cfg.num_kv_heads, self.num_pages, self.device) if self.device.type == "cuda" else None

    def _plan(self, positions: torch.Tensor) -> None:
        t, start = positions.numel(), self.length
        self._cos_sin = self.rotary.cos_sin(positions, self.dtype)
        self._positions = positions
        if t == 1:
            self._mask = None
            if self._pages is not None:
                self._pages.set_length(positions[:1].to(torch.int32) + 1)  # after this step's token
        else:
            # Causal over (cached + new) keys: query i sees keys 0 .. start+i; one row per
            # (group member, query), matching the folded query layout of attend().
            q_idx = torch.arange(t, device=self.device)[:, None] + start
            k_idx = torch.arange(start + t, device=self.device)[None, :]
            self._mask = (k_idx <= q_idx).repeat(self.cfg.gqa_group, 1)

    def attend(self, layer, q, k, v):
        t, start = q.shape[0], self.length
        hkv, g, d = self.cfg.num_kv_heads, self.cfg.gqa_group, self.cfg.head_dim
        cos, sin = self._cos_sin
        q = Rotary.apply(q, cos, sin)
        if t == 1 and q.is_cuda:
            # Written at the device position, read as pages: nothing here depends on host lengths.
            self.k[layer].index_copy_(1, self._positions, Rotary.apply(k, cos, sin).transpose(0, 1))
            self.v[layer].index_copy_(1, self._positions, v.transpose(0, 1))
            return self._pages.attend(q, self.k[layer], self.v[layer], self.sm_scale)
        self.k[layer, :, start:start + t] = Rotary.apply(k, cos, sin).transpose(0, 1)
        self.v[layer, :, start:start + t] = v.transpose(0, 1)
        keys = self.k[layer, :, : start + t]
        values = self.v[layer, :, : start + t]
        if t > 1 and q.is_cuda:
            # Flash attention in O(T) memory: the chunk's causal self-attention, merged by
            # log-sum-exp with its attention to the cached past (an explicit mask would make SDPA
            # fall back to materialising every score).
            return _chunk_attention(q, keys, values, start, g, self.sm_scale)
        # Fold each GQA group's query heads into rows against its one KV head: no K/V repeat,
        # and far faster than SDPA's enable_gqa path on the CPU.
        rows = q.view(t, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * t, d)
        out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=self._mask)
        return out.view(hkv, g, t, d).permute(2, 0, 1, 3).reshape(t, hkv * g, d)

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def memory_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def snapshot_layout(self) -> dict[str, Any]:
        return {"cache": "dense", "dtype": str(self.dtype)}

    def export_layer(self, layer: int) -> dict[str, torch.Tensor]:
        return {"k": self.k[layer, :, :self.length], "v": self.v[layer, :, :self.length]}  # (Hkv, T, D) post-RoPE

    def import_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        t = tensors["k"].shape[1]
        self.k[layer, :, :t] = tensors["k"]
        self.v[layer, :, :t] = tensors["v"]
