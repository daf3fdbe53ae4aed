"""Gemma 3 on LlamaModel's seams: the embedding scaled by sqrt(hidden), QK-norm, a query scale of
1/sqrt(query_pre_attn_scalar), norms before and after attention and the MLP, GeGLU (tanh GELU)
and an optional final logit cap. Which layers are local (sliding window) and their rope base are
the cache's business (lcrun.runtime.layer_kind_cache): the layer code is the same for both kinds.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from lcrun.kernels.fused_norm import rms_norm
from lcrun.kernels.quant.linear import embedding, linear
from lcrun.ranges import named_range
from lcrun.runtime.kv_cache import AttentionCache
from lcrun.runtime.model import LayerWeights, LlamaModel


class GemmaModel(LlamaModel):
    @functools.cached_property
    def _embed_scale(self) -> float:
        # Rounded to the model's dtype first, as transformers does (55.4 -> 55.5 in bf16), and kept a
        # Python number: no host tensor is copied in per step (a captured decode graph cannot).
        return torch.tensor(math.sqrt(self.cfg.hidden_size), dtype=self.dtype).item()

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return embedding(input_ids, self.embed, self.dtype) * self._embed_scale

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = super()._logits(h)
        cap = self.cfg.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _layer(self, i: int, lw: LayerWeights, x: torch.Tensor, cache: AttentionCache,
               delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As LlamaModel._layer (input x + delta, output the sum of the pair returned)."""
        cfg, t = self.cfg, x.shape[0]
        with named_range("dense"):
            h, x = self._add_norm(x, delta, lw.attn_norm)
            q, k, v = self._qkv(lw, h)
            # The caches scale scores by 1/sqrt(head_dim); RoPE is linear, so scaling q first is the same.
            if cfg.query_pre_attn_scalar is not None and cfg.query_pre_attn_scalar != cfg.head_dim:
                q = q * math.sqrt(cfg.head_dim / cfg.query_pre_attn_scalar)
        self._lookahead(i, x, cache)
        with named_range("attention"):
            attn = cache.attend(i, q, k, v)
        with named_range("dense"):
            out = rms_norm(linear(attn.reshape(t, -1), lw.wo, lw.bo), lw.post_attn_norm, cfg.rms_eps)
            h, x = self._add_norm(x, out, lw.mlp_norm)
            gate, up = linear(h, lw.w_gate_up).chunk(2, dim=-1)
            out = linear(F.gelu(gate, approximate="tanh") * up, lw.w_down)
            return x, rms_norm(out, lw.post_mlp_norm, cfg.rms_eps)


def model_class(arch: str) -> type[LlamaModel]:
    """The model implementation for a ModelConfig.arch."""
    return GemmaModel if arch == "gemma3" else LlamaModel
