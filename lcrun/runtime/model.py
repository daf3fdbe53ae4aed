"""One torch implementation of Llama-family decoders (Llama 2/3.x, Mistral, Qwen2/3, SmolLM2).

Batch size 1. q/k/v and gate/up projections are fused into one matmul each: decode is bound by
streaming weights, and one larger GEMV beats three small launches. Weight matrices are dense
tensors or quantized (lcrun.kernels.quant: GGUF blocks kept on the device); ``linear`` and
``embedding`` dispatch on which. Attention goes through the
cache object (``lcrun.runtime.kv_cache``), so dense, paged and tiered caches share this code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from lcrun.kernels.fused_norm import rms_norm
from lcrun.kernels.quant.linear import embedding, linear
from lcrun.kernels.quant.weight import QuantWeight, Weight, row_slice, weight_format, weight_nbytes
from lcrun.ranges import named_range
from lcrun.runtime.kv_cache import AttentionCache
from lcrun.runtime.model_config import ModelConfig


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor   # (hidden,)
    wqkv: Weight              # ((Hq + 2 Hkv) * D, hidden)
    bqkv: torch.Tensor | None
    wo: Weight                # (hidden, Hq * D)
    bo: torch.Tensor | None
    mlp_norm: torch.Tensor    # (hidden,)
    w_gate_up: Weight         # (2 * inter, hidden)
    w_down: Weight            # (hidden, inter)
    q_norm: torch.Tensor | None = None  # (D,) per-head RMSNorm of q before RoPE (cfg.qk_norm)
    k_norm: torch.Tensor | None = None  # (D,) same for k
    # Gemma 3 (lcrun.runtime.model_gemma): norms of the attention and MLP outputs before each
    # residual add; mlp_norm is then its pre-feedforward norm. Norm weights are multiplicative
    # everywhere: Gemma's (1 + w) is folded in when loading.
    post_attn_norm: torch.Tensor | None = None  # (hidden,)
    post_mlp_norm: torch.Tensor | None = None   # (hidden,)


class LlamaModel:
    def __init__(self, cfg: ModelConfig, embed: torch.Tensor | QuantWeight, layers: list[LayerWeights],
                 final_norm: torch.Tensor, lm_head: Weight):
        self.cfg = cfg
        self.embed = embed
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head

    @property
    def device(self) -> torch.device:
        return self.final_norm.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the norms are kept in it, whatever the matrices' format)."""
        return self.final_norm.dtype

    def weight_format(self) -> str:
        """The layers' matrices' format: a dtype (bfloat16), a GGUF type (Q4_0) or several (Q4_K+Q6_K)."""
        kinds = {f for lw in self.layers for w in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down)
                 for f in weight_format(w).split("+")}
        return "+".join(sorted(kinds))

    def weight_bytes(self) -> int:
        tensors = [self.embed, self.final_norm]
        if self.lm_head is not self.embed:
            tensors.append(self.lm_head)
        for lw in self.layers:
            tensors += [t for t in vars(lw).values() if t is not None]
        return sum(weight_nbytes(t) for t in tensors)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: AttentionCache, all_logits: bool = False,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (T,) int64 on the model's device, continuing what ``cache`` holds.
        positions: (T,) int64 device tensor, default cache.length onwards (a captured decode step
        passes a static tensor it refills before each replay).
        Returns fp32 logits (T, vocab) if ``all_logits`` else (1, vocab) for the last token."""
        t = input_ids.shape[0]
        if positions is None:
            positions = torch.arange(cache.length, cache.length + t, device=self.device)
        cache.begin_forward(positions)
        x, delta = self._embed(input_ids), None
        for i, lw in enumerate(self.layers):
            x, delta = self._layer(i, lw, x, cache, delta)
        cache.end_forward()
        if not all_logits:
            x, delta = x[-1:], None if delta is None else delta[-1:]
        with named_range("lm_head"):
            return self._logits(self._add_norm(x, delta, self.final_norm)[0])

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) token ids -> (T, hidden) input of layer 0."""
        return embedding(input_ids, self.embed, self.dtype)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """The final-normed hidden states (T, hidden) -> fp32 logits (T, vocab)."""
        return linear(h, self.lm_head).float()

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor | None,
                  weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(s), s) with s = x + delta (x if delta is None): the add and norm in one launch."""
        if delta is None:
            return rms_norm(x, weight, self.cfg.rms_eps), x
        return rms_norm(x, weight, self.cfg.rms_eps, residual=delta)

    def _predict_query(self, nxt: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        """The next layer's pre-RoPE query from this layer's input x (1, hidden): InfiniGen's
        prediction, close to the real one because the residual stream changes little per layer."""
        cfg = self.cfg
        rows = cfg.num_heads * cfg.head_dim
        h = rms_norm(x, nxt.attn_norm, cfg.rms_eps)
        bias = None if nxt.bqkv is None else nxt.bqkv[:rows]
        q = linear(h, row_slice(nxt.wqkv, 0, rows), bias).view(1, cfg.num_heads, cfg.head_dim)
        return q if nxt.q_norm is None else self._head_norm(q, nxt.q_norm)

    def _lookahead(self, i: int, x: torch.Tensor, cache: AttentionCache) -> None:
        """Offer a decode step's cache the next layer's predicted query; x: this layer's input."""
        if x.shape[0] == 1 and cache.wants_lookahead(i):
            nxt = self.layers[i + 1]
            cache.lookahead(i, lambda: self._predict_query(nxt, x))

    def _head_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm over the last dim of x (T, H, D) with weight (D,): Qwen 3 / Gemma 3 QK-norm."""
        t, h, d = x.shape
        return rms_norm(x.reshape(t * h, d), weight, self.cfg.rms_eps).view(t, h, d)

    def _qkv(self, lw: LayerWeights, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (T, Hq, D), k and v (T, Hkv, D), pre-RoPE, from the normed input h (T, hidden)."""
        cfg, t = self.cfg, h.shape[0]
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, k, v = linear(h, lw.wqkv, lw.bqkv).split((hq * d, hkv * d, hkv * d), dim=-1)
        q, k, v = q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)
        if lw.q_norm is not None:
            q, k = self._head_norm(q, lw.q_norm), self._head_norm(k, lw.k_norm)
        return q, k, v

    def _layer(self, i: int, lw: LayerWeights, x: torch.Tensor, cache: AttentionCache,
               delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's input is x + delta (x if delta is None); returns (x', delta') whose sum is
        its output. Each residual add is left to the norm after it, which fuses it (one launch)."""
        t = x.shape[0]
        # Named ranges split a profiled step (lcrun profile); without a profiler they are no-ops.
        with named_range("dense"):
            h, x = self._add_norm(x, delta, lw.attn_norm)
            q, k, v = self._qkv(lw, h)
        self._lookahead(i, x, cache)
        with named_range("attention"):
            attn = cache.attend(i, q, k, v)
        with named_range("dense"):
            h, x = self._add_norm(x, linear(attn.reshape(t, -1), lw.wo, lw.bo), lw.mlp_norm)
            gate, up = linear(h, lw.w_gate_up).chunk(2, dim=-1)
            return x, linear(F.silu(gate) * up, lw.w_down)

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
            x[c0:c0 + chunk].copy_(self._embed(input_ids[c0:c0 + chunk]), non_blocking=on_host)
        n_layers = len(self.layers)
        for i, lw in enumerate(self.layers):
            for c0 in range(0, t, chunk):
                xs = x[c0:c0 + chunk].to(self.device, non_blocking=True) if on_host else x[c0:c0 + chunk]
                out, delta = self._layer(i, lw, xs, cache)
                x[c0:c0 + chunk].copy_(out + delta, non_blocking=on_host)
            if progress is not None:
                progress(t * (i + 1) // n_layers, t)
        if on_host and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the last chunk's copy has landed
        last = x[-1:].to(self.device).clone()  # the buffer may be page-cache memory, reused once decode starts
        cache.end_forward()
        return self._logits(rms_norm(last, self.final_norm, cfg.rms_eps))
