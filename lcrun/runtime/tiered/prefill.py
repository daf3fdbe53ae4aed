"""Prefill into the tiered store, layer by layer.

The model drives it through ``LlamaModel.forward_layerwise``: all chunks of the prompt pass layer
0, then layer 1, and so on. One layer's K/V for the whole context sits in a staging area lent by
the GPU page cache (unused while prefilling), so each chunk attends exactly to everything before
it with flash attention, and each layer's past is read from the host (or NVMe) once, not once per
chunk. At the end of a layer its new pages go to their homes: the host pool, or -- when the host
cap is smaller than the KV cache -- NVMe for the pages between the sinks and the most recent ones
(``SpillPlacement``). With ``sparse`` a chunk attends to the sinks, its window and its top pages
only; past the trained window, queries attend at window positions (lcrun.runtime.positions).
"""
from __future__ import annotations

import torch

from lcrun.kernels.attention_lse import RunningAttention, attention_with_lse
from lcrun.runtime.kv_cache import _chunk_attention
from lcrun.runtime.positions import PositionRule, window_prefill_attention
from lcrun.runtime.rope import Rotary
from lcrun.runtime.tiered.codec import PageCodec
from lcrun.runtime.tiered.config import TierConfig
from lcrun.runtime.tiered.homes import HostHomes
from lcrun.runtime.tiered.page_cache import GpuPageCache
from lcrun.runtime.tiered.placement import SpillPlacement
from lcrun.runtime.tiered.selection import PageSelector
from lcrun.runtime.tiered.stats import TierStats


class LayerwisePrefill:
    """One prefill at a time: ``begin``, then ``attend`` for every layer and every chunk in order,
    then ``end``. Staging: (Hkv, capacity, D) model dtype, post-RoPE keys."""

    def __init__(self, conf: TierConfig, rotary: Rotary, positions: PositionRule, pages: GpuPageCache,
                 homes: HostHomes, codec: PageCodec, selector: PageSelector, stats: TierStats, sparse: bool):
        self.conf, self.rotary, self.positions, self.sparse = conf, rotary, positions, sparse
        self.pages, self.homes, self.codec, self.selector, self.stats = pages, homes, codec, selector, stats
        self.placement = SpillPlacement(homes, codec, stats) if homes.spills else None
        self._k = self._v = None
        self._last_query: list[torch.Tensor | None] = [None]  # per layer, the prompt's last query (end())
        self.prompt_end = 0  # where the prompt being prefilled ends (the cache's begin_prefill)

    def begin(self, positions: torch.Tensor, start: int) -> None:
        """A prompt of positions (T,) after ``start`` cached tokens. The GPU page cache is emptied
        and its memory holds the staging area meanwhile."""
        self._positions, self._start, self._n = positions, start, positions.numel()
        self._done = [0] * self.conf.cfg.num_layers
        self._last_query = [None] * self.conf.cfg.num_layers
        self.begin_staging()

    def begin_staging(self) -> None:
        """Settle the movers and take the staging area (a prefill, or a saved context read or written)."""
        self.homes.settle_movers()
        cfg = self.conf.cfg
        shape, dtype = (cfg.num_kv_heads, self.conf.capacity, cfg.head_dim), self.conf.dtype
        self.pages.start_lending()
        k, v = self.pages.lend(shape, dtype), self.pages.lend(shape, dtype)
        if k is None or v is None:  # a page cache smaller than one layer's K/V: its own buffers
            k = torch.empty(shape, device=self.conf.device, dtype=dtype)
            v = torch.empty(shape, device=self.conf.device, dtype=dtype)
            self.pages.stop_lending()
        self._k, self._v = k, v

    def end(self) -> None:
        """The staging area is released, and the emptied GPU page cache is filled with the pages the
        next decode steps most likely attend (``PageSelector.warm_scores``): otherwise the first
        steps after every prompt would fetch almost every page they select over PCIe."""
        self._k = self._v = None
        if any(q is None for q in self._last_query):
            return  # an unfinished prefill, or staging for a saved context
        end = self._start + self._n
        pages = sum(self.pages.fill(layer, self.selector.logical, self.selector.warm_scores(layer, q_last, end))
                    for layer, q_last in enumerate(self._last_query))
        self.stats.prefill_bytes_h2d += int(pages) * self.codec.page_bytes  # one sync per prompt
        self._last_query = [None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The layer's next chunk: q (t, Hq, D), k/v (t, Hkv, D) pre-RoPE -> (t, Hq, D)."""
        conf, P = self.conf, self.conf.page_size
        t, start, off = q.shape[0], self._start, self._done[layer]
        if off == 0 and start > 0:
            self._stage_past(layer, start)
        cos, sin = self.rotary.cos_sin(self._positions[off:off + t], conf.dtype)
        q_pre = q
        q, k_rot = Rotary.apply_qk(q, k, cos, sin)
        pos0 = start + off
        self._k[:, pos0:pos0 + t] = k_rot.to(conf.dtype).transpose(0, 1)
        self._v[:, pos0:pos0 + t] = v.to(conf.dtype).transpose(0, 1)
        if self.sparse:  # later chunks score this chunk's pages
            self.selector.set_from_keys(layer, self._k, pos0 // P, pos0 + t)
        if self.positions.may_move:  # before attending: later pieces of this chunk select among its pages
            self.selector.add_relative(layer, k, self._positions[off:off + t])
        n_true = self.positions.true_queries(pos0, t, self.prompt_end)
        outs = []
        if n_true and self.sparse and pos0 > conf.budget:
            outs.append(self._sparse_chunk_attention(layer, q[:n_true].to(conf.dtype), pos0))
        elif n_true:
            outs.append(_chunk_attention(q[:n_true].to(conf.dtype), self._k[:, :pos0 + n_true],
                                         self._v[:, :pos0 + n_true], pos0, conf.cfg.gqa_group, conf.sm_scale))
        if n_true < t:
            outs.append(window_prefill_attention(
                q_pre[n_true:].to(conf.dtype), self._k, self._v, self.selector.rel_min[layer],
                self.selector.rel_max[layer], pos0 + n_true, self.rotary, page_size=P,
                sink_tokens=conf.sink_tokens, window_tokens=conf.window_tokens, budget=conf.budget,
                group_score=conf.group_score, sm_scale=conf.sm_scale))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        self._done[layer] = off + t
        if off + t == self._n:
            self._finish_layer(layer, start, start + self._n)
            self._last_query[layer] = q[-1].clone()  # not a view: it would keep the chunk alive
        return out

    def _sparse_chunk_attention(self, layer: int, q: torch.Tensor, pos0: int) -> torch.Tensor:
        """Top-k sparse prefill: the chunk q (t, Hq, D) post-RoPE at pos0 attends to the sinks, the
        ``window_tokens`` before it, itself (causal) and the pages that score best for the chunk
        as a whole, within ``budget`` tokens per KV head. A page's score is the mean over the
        chunk's queries of Quest's bound, which is exact in two matmuls: with c = (max + min) / 2
        and r = (max - min) / 2 per channel, bound(q) = q.c + |q|.r."""
        conf, dev = self.conf, self.conf.device
        t, P, sm_scale = q.shape[0], conf.page_size, conf.sm_scale
        hkv, g, d = conf.cfg.num_kv_heads, conf.cfg.gqa_group, conf.cfg.head_dim
        w0 = max(0, pos0 - conf.window_tokens) // P * P             # the local part starts on a page
        far_pages = w0 // P
        sink_pages = min(-(-conf.sink_tokens // P), far_pages)
        top = max(0, (conf.budget - conf.window_tokens) // P - sink_pages)
        rows = q.view(t, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * t, d)
        pages = torch.arange(sink_pages, device=dev).expand(hkv, -1)
        if top and far_pages > sink_pages:
            kmin = self.selector.kmin[layer, :, sink_pages:far_pages].float()
            kmax = self.selector.kmax[layer, :, sink_pages:far_pages].float()
            qg = q.float().view(t, hkv, g, d)
            q_mean, q_abs = qg.mean(0), qg.abs().mean(0)                       # (Hkv, g, D)
            scores = (q_mean @ ((kmax + kmin) / 2).transpose(1, 2)
                      + q_abs @ ((kmax - kmin) / 2).transpose(1, 2))           # (Hkv, g, pages)
            scores = scores.amax(1) if conf.group_score == "max" else scores.sum(1)
            best = scores.topk(min(top, far_pages - sink_pages), dim=1).indices + sink_pages
            pages = torch.cat((pages, best), dim=1)
        tok = (pages[:, :, None] * P + torch.arange(P, device=dev)).reshape(hkv, -1)
        heads = torch.arange(hkv, device=dev)[:, None]
        # The chunk itself (causal), the local part before it, then the selected pages: merged by LSE.
        own_k = self._k[:, pos0:pos0 + t].repeat_interleave(g, 0)
        own_v = self._v[:, pos0:pos0 + t].repeat_interleave(g, 0)
        o, lse = attention_with_lse(q.transpose(0, 1).contiguous(), own_k, own_v, True, sm_scale)
        acc = RunningAttention(o.view(hkv, g, t, d).reshape(hkv, g * t, d), lse.view(hkv, g * t))
        if pos0 > w0:
            acc.add(*attention_with_lse(rows, self._k[:, w0:pos0], self._v[:, w0:pos0], False, sm_scale))
        if tok.shape[1]:
            acc.add(*attention_with_lse(rows, self._k[heads, tok], self._v[heads, tok], False, sm_scale))
        return acc.result(q.dtype).view(hkv, g, t, d).permute(2, 0, 1, 3).reshape(t, hkv * g, d)

    def _stage_past(self, layer: int, start: int) -> None:
        """Pages [0, ceil(start / P)) of a layer into the staging area: host pages in one zero-copy
        gather, NVMe-only pages through a pinned bounce buffer."""
        n = -(-start // self.conf.page_size)
        self.homes.gather(layer, n, self._k, self._v, self.codec.scales(layer))
        self.stats.prefill_bytes_h2d += self.conf.cfg.num_kv_heads * n * self.codec.page_bytes
        if self.placement is not None:
            self.placement.read_spilled(layer, n, self._k, self._v)

    def _finish_layer(self, layer: int, start: int, end: int) -> None:
        """The layer's new tokens go to their homes; abstracts of the touched pages are updated."""
        if start == 0:  # fp8 pages: scales from the whole first prompt, before any page is written
            self.codec.set_scales(layer, self._k[:, :end], self._v[:, :end], token_dim=1)
        self._store_layer(layer, start, end)

    def _store_layer(self, layer: int, start: int, end: int) -> None:
        """Staged tokens [start, end) of ``layer`` to their homes, with their pages' abstracts."""
        P = self.conf.page_size
        first = start // P
        self.selector.set_from_keys(layer, self._k, first, end)
        self.selector.refresh_chunks(layer, first, end)
        if self.placement is not None:
            self.placement.place(layer, first, -(-end // P), end // P, self._k, self._v, start % P != 0)
        self.pages.write_through(layer, self._k[:, start:end].transpose(0, 1), self._v[:, start:end].transpose(0, 1),
                                 start)

    # -- saved contexts: the staging area carries one layer between the file and the homes ---------
    def export_layer(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [0, length) of ``layer`` from their homes: K, V (Hkv, length, D) model dtype, post-RoPE
        (inside ``begin_staging`` .. ``end``)."""
        self._stage_past(layer, length)
        return self._k[:, :length], self._v[:, :length]

    def restore_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor, kv_scale: torch.Tensor | None) -> None:
        """A saved layer's K, V (Hkv, T, D) post-RoPE into their homes through the prefill's write
        path, encoded with the saved fp8 scales (inside ``begin_staging`` .. ``end``)."""
        t = k.shape[1]
        self._k[:, :t] = k
        self._v[:, :t] = v
        if kv_scale is not None:
            self.codec.kv_scale[layer].copy_(kv_scale)
        self._store_layer(layer, 0, t)
