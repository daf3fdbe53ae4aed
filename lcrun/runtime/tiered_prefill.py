"""Prefill into the tiered KV store, and the page abstracts it builds: the part of
``TieredTopKCache`` that runs before decode (mixed into it; it uses the cache's pools and maps).

Prefill runs layer by layer (``begin_layerwise``; the model drives it through
``LlamaModel.forward_layerwise``): all chunks of the prompt pass layer 0, then layer 1, and so on.
One layer's K/V for the whole context sits in a staging area carved from the GPU page cache
(unused while prefilling), so each chunk attends exactly to everything before it with flash
attention, and each layer's past is read from the host (or NVMe) once, not once per chunk. At the
end of a layer its new pages go to their homes: the host pool, or -- when the host cap is smaller
than the KV cache -- NVMe for the pages between the sinks and the most recent ones (written by a
background thread while the next layer computes). With ``sparse_prefill`` a chunk attends to the
sinks, its window and its top pages only.

The older chunk-major path (``attend`` with T > 1 outside ``begin_layerwise``, the past streamed
from the host in double-buffered blocks) remains for host-only stores.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from lcrun.kernels.attention_lse import RunningAttention, attention_with_lse
from lcrun.kernels.tiered_reference import decode as decode_pages
from lcrun.kernels.tiered_reference import encode as encode_pages
from lcrun.kernels.key_rotation import update_relative_abstracts
from lcrun.runtime.kv_cache import _chunk_attention
from lcrun.runtime.positions import window_prefill_attention
from lcrun.runtime.rope import Rotary


class TieredPrefill:
    """Prefill and page-abstract methods of ``TieredTopKCache`` (not usable on their own)."""

    # -- abstracts ---------------------------------------------------------------------------------
    def _update_abstracts(self, layer: int, k: torch.Tensor) -> None:
        """Running per-page key min/max of the pages a prefill chunk's tokens land in (a page
        restarts its running values at its first token), so a page's abstract is right the step
        it fills. (A decode token's page is updated by write_through.)"""
        P, t = self.page_size, k.shape[0]
        kmin, kmax = self.kmin[layer], self.kmax[layer]
        pos = self._pos
        first = pos[:1] // P                                          # device, no sync
        n = (self.length + t - 1) // P - self.length // P + 1         # pages touched (host arithmetic)
        page_ids = first + torch.arange(n, device=self.device)
        local = (pos // P - first)[None, :, None].expand(self.cfg.num_kv_heads, t, self.cfg.head_dim)
        kt = k.transpose(0, 1)
        tmp_min = torch.full((self.cfg.num_kv_heads, n, self.cfg.head_dim), float("inf"), device=self.device,
                             dtype=self.dtype).scatter_reduce_(1, local, kt, "amin")
        tmp_max = torch.full_like(tmp_min, float("-inf")).scatter_reduce_(1, local, kt, "amax")
        continuing = ((torch.arange(n, device=self.device) == 0) & (pos[0] % P != 0))[None, :, None]
        kmin.index_copy_(1, page_ids, torch.where(continuing, torch.minimum(kmin.index_select(1, page_ids), tmp_min),
                                                  tmp_min))
        kmax.index_copy_(1, page_ids, torch.where(continuing, torch.maximum(kmax.index_select(1, page_ids), tmp_max),
                                                  tmp_max))
        self._refresh_chunks(layer, self.length // P, self.length + t)

    def _refresh_chunks(self, layer: int, first_page: int, end: int) -> None:
        """Hierarchical selection: the chunk abstracts of pages first_page .. ceil(end / P) - 1, with
        the pages full at ``end`` tokens counted."""
        if not self.chunk_pages:
            return
        P = self.page_size
        pages = torch.arange(first_page, -(-end // P), device=self.device, dtype=torch.int32)
        full = torch.tensor([end // P], device=self.device, dtype=torch.int32)
        lo, hi = self._selection_abstracts(layer, self.positions.may_move)
        self.ops.update_chunk_abstracts(lo, hi, self.cmin[layer], self.cmax[layer], pages, full, self.chunk_pages)

    def _abstracts_from_staging(self, layer: int, first_page: int, end: int) -> None:
        """Min/max of pages first_page .. ceil(end / P) - 1 from the staged keys (the staged past
        covers the part of a continuing page written by an earlier prompt)."""
        P, hkv, d = self.page_size, self.cfg.num_kv_heads, self.cfg.head_dim
        full = end // P
        if full > first_page:
            keys = self._lw_k[:, first_page * P:full * P].reshape(hkv, full - first_page, P, d)
            self.kmin[layer, :, first_page:full] = keys.amin(2)
            self.kmax[layer, :, first_page:full] = keys.amax(2)
        if end % P:
            keys = self._lw_k[:, full * P:end]
            self.kmin[layer, :, full] = keys.amin(1)
            self.kmax[layer, :, full] = keys.amax(1)

    # -- layer-by-layer prefill --------------------------------------------------------------------
    layerwise_prefill = True

    def _carve(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A tensor from the page cache's memory (K pool, then V pool, as bytes: the pages may be
        fp8; a bump allocator reset per prefill), or None when it does not fit."""
        nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        for i, storage in enumerate((self.gpu_k, self.gpu_v)):
            if i < self._carve_at[0]:
                continue
            offset = self._carve_at[1] if i == self._carve_at[0] else 0
            offset = -(-offset // 256) * 256  # aligned for any dtype and vector loads
            raw = storage.view(-1).view(torch.uint8)
            if offset + nbytes <= raw.numel():
                self._carve_at = (i, offset + nbytes)
                return raw[offset:offset + nbytes].view(dtype).view(shape)
        return None

    def begin_layerwise(self, positions: torch.Tensor) -> None:
        """Start a prefill that the caller runs layer-major: for each layer, ``attend`` on every
        chunk of ``positions`` in order; then ``end_forward``. The GPU page cache is emptied and
        its memory holds one layer's K/V for the whole context meanwhile."""
        if self.spills:
            self.promoter.wait_idle()
            self._apply_promotions()
        self._layerwise = True
        try:
            self.begin_forward(positions)
        except BaseException:
            self._layerwise = False
            raise
        self._lw_done = [0] * self.cfg.num_layers
        self.tag.fill_(-1)
        shape = (self.cfg.num_kv_heads, self.capacity, self.cfg.head_dim)
        self._carve_at = (0, 0)
        k, v = self._carve(shape, self.dtype), self._carve(shape, self.dtype)
        if k is None or v is None:  # a page cache smaller than one layer's K/V: its own buffers
            k = torch.empty(shape, device=self.device, dtype=self.dtype)
            v = torch.empty(shape, device=self.device, dtype=self.dtype)
            self._carve_at = (2, 0)
        self._lw_k, self._lw_v = k, v

    def prefill_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """Room for the prefill's hidden states in the page cache memory beyond the staging area
        (None when it does not fit: the caller allocates)."""
        return self._carve(shape, dtype)

    def _attend_layerwise(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t, start, off = q.shape[0], self.length, self._lw_done[layer]
        if off == 0 and start > 0:
            self._stage_past(layer, start)
        cos, sin = self._cos_sin
        cos, sin = cos[off:off + t], sin[off:off + t]
        q_pre = q
        q, k_rot = Rotary.apply_qk(q, k, cos, sin)
        pos0 = start + off
        self._lw_k[:, pos0:pos0 + t] = k_rot.to(self.dtype).transpose(0, 1)
        self._lw_v[:, pos0:pos0 + t] = v.to(self.dtype).transpose(0, 1)
        if self.sparse_prefill:  # later chunks score this chunk's pages
            self._abstracts_from_staging(layer, pos0 // self.page_size, pos0 + t)
        if self.positions.may_move:  # before attending: later pieces of this chunk select among its pages
            update_relative_abstracts(k.to(self.dtype), self._pos[off:off + t], self.rotary.inv_freq,
                                      self.rel_min[layer], self.rel_max[layer], self.page_size)
        window = self.positions.first_window_position()
        n_true = t if window is None else max(0, min(t, window - pos0))
        outs = []
        if n_true and self.sparse_prefill and pos0 > self.budget:
            outs.append(self._sparse_chunk_attention(layer, q[:n_true].to(self.dtype), pos0))
        elif n_true:
            outs.append(_chunk_attention(q[:n_true].to(self.dtype), self._lw_k[:, :pos0 + n_true],
                                         self._lw_v[:, :pos0 + n_true], pos0, self.cfg.gqa_group, self.sm_scale))
        if n_true < t:
            outs.append(window_prefill_attention(
                q_pre[n_true:].to(self.dtype), self._lw_k, self._lw_v, self.rel_min[layer], self.rel_max[layer],
                pos0 + n_true, self.rotary, page_size=self.page_size, sink_tokens=self.sink_tokens,
                window_tokens=self.window_tokens, budget=self.budget, group_score=self.group_score,
                sm_scale=self.sm_scale))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        self._lw_done[layer] = off + t
        if off + t == self._pending:
            self._finish_layer(layer, start, start + self._pending)
        return out

    def _sparse_chunk_attention(self, layer: int, q: torch.Tensor, pos0: int) -> torch.Tensor:
        """Top-k sparse prefill (``sparse_prefill``): the chunk at pos0 attends to the sinks, the
        ``window_tokens`` before it, itself (causal) and the pages that score best for the chunk
        as a whole, within ``budget`` tokens per KV head. A page's score is the mean over the
        chunk's queries of Quest's bound, which is exact in two matmuls: with c = (max + min) / 2
        and r = (max - min) / 2 per channel, bound(q) = q.c + |q|.r."""
        t, P = q.shape[0], self.page_size
        hkv, g, d = self.cfg.num_kv_heads, self.cfg.gqa_group, self.cfg.head_dim
        w0 = max(0, pos0 - self.window_tokens) // P * P             # the local part starts on a page
        far_pages = w0 // P
        sink_pages = min(-(-self.sink_tokens // P), far_pages)
        top = max(0, (self.budget - self.window_tokens) // P - sink_pages)
        rows = q.view(t, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * t, d)
        pages = torch.arange(sink_pages, device=self.device).expand(hkv, -1)
        if top and far_pages > sink_pages:
            kmin = self.kmin[layer, :, sink_pages:far_pages].float()
            kmax = self.kmax[layer, :, sink_pages:far_pages].float()
            qg = q.float().view(t, hkv, g, d)
            q_mean, q_abs = qg.mean(0), qg.abs().mean(0)                       # (Hkv, g, D)
            scores = (q_mean @ ((kmax + kmin) / 2).transpose(1, 2)
                      + q_abs @ ((kmax - kmin) / 2).transpose(1, 2))           # (Hkv, g, pages)
            scores = scores.amax(1) if self.group_score == "max" else scores.sum(1)
            best = scores.topk(min(top, far_pages - sink_pages), dim=1).indices + sink_pages
            pages = torch.cat((pages, best), dim=1)
        tok = (pages[:, :, None] * P + torch.arange(P, device=self.device)).reshape(hkv, -1)
        heads = torch.arange(hkv, device=self.device)[:, None]
        # The chunk itself (causal), the local part before it, then the selected pages: merged by LSE.
        own_k = self._lw_k[:, pos0:pos0 + t].repeat_interleave(g, 0)
        own_v = self._lw_v[:, pos0:pos0 + t].repeat_interleave(g, 0)
        o, lse = attention_with_lse(q.transpose(0, 1).contiguous(), own_k, own_v, True, self.sm_scale)
        acc = RunningAttention(o.view(hkv, g, t, d).reshape(hkv, g * t, d), lse.view(hkv, g * t))
        if pos0 > w0:
            acc.add(*attention_with_lse(rows, self._lw_k[:, w0:pos0], self._lw_v[:, w0:pos0], False, self.sm_scale))
        if tok.shape[1]:
            acc.add(*attention_with_lse(rows, self._lw_k[heads, tok], self._lw_v[heads, tok], False, self.sm_scale))
        return acc.result(q.dtype).view(hkv, g, t, d).permute(2, 0, 1, 3).reshape(t, hkv * g, d)

    def _stage_past(self, layer: int, start: int) -> None:
        """Copy pages [0, ceil(start / P)) of a layer into the staging area: host pages in one
        zero-copy gather, NVMe-only pages through a pinned bounce buffer."""
        n = -(-start // self.page_size)
        table = self.host_slot[layer][:, :n].clamp(min=0).contiguous()
        self.tier_ops.gather_pages_to_staging(self.host_kv[layer], table, n, self._lw_k, self._lw_v,
                                              kv_scale=self.scales(layer))
        self.stats.prefill_bytes_h2d += self.cfg.num_kv_heads * n * self.page_bytes
        if not self.spills:
            return
        d = self.directory
        heads = np.arange(self.cfg.num_kv_heads)[:, None] * self.max_pages
        flats = (heads + np.arange(n)[None, :]).ravel()
        on_disk = flats[d.host_map[layer, flats] < 0]
        if on_disk.size == 0:
            return
        self.writer.flush()
        rows = self.writer.rows_per_buffer
        for i in range(0, on_disk.size, rows):
            part = on_disk[i:i + rows]
            buf = self.writer.buffer()
            try:
                self.nvme.read_into_sync(d.nvme_map[layer, part].tolist(), buf[:part.size])
                h = torch.from_numpy(part // self.max_pages).to(self.device)
                pages = self._bytes_to_pages(buf[:part.size].to(self.device, non_blocking=True), layer, h)
                p = torch.from_numpy(part % self.max_pages).to(self.device)
                tok = p[:, None] * self.page_size + torch.arange(self.page_size, device=self.device)
                self._lw_k[h[:, None], tok] = pages[:, 0]
                self._lw_v[h[:, None], tok] = pages[:, 1]
                if self.device.type == "cuda":
                    torch.cuda.current_stream(self.device).synchronize()  # the bounce is reused next
            finally:
                self.writer.give_back(buf)
            self.stats.prefill_nvme_read_bytes += part.size * self.slot_bytes

    def _bytes_to_pages(self, rows: torch.Tensor, layer: int, heads: torch.Tensor) -> torch.Tensor:
        """(n, slot_bytes) uint8 of KV ``heads`` (n,) -> (n, 2, P, D) pages in the model dtype (the
        slot's padding dropped; fp8 codes decoded with the layer's scales)."""
        pages = rows[:, :self.page_bytes].view(self.store_dtype).view(-1, 2, self.page_size, self.cfg.head_dim)
        scale = self.scales(layer)
        return decode_pages(pages, None if scale is None else scale[heads, :2, None, None], self.dtype)

    def _host_plan(self, n_pages: int) -> tuple[int, int]:
        """Pages per head that stay in the host pool after a prefill: [0, sinks) and
        [recent_from, n_pages); the pages between live on NVMe."""
        keep = (self.host_slots_per_layer - self.reserve) // self.cfg.num_kv_heads
        sinks = min(-(-self.sink_tokens // self.page_size), keep)
        return sinks, max(sinks, n_pages - (keep - sinks))

    def _finish_layer(self, layer: int, start: int, end: int) -> None:
        """The layer's new tokens go to their homes; abstracts of the touched pages are updated."""
        P = self.page_size
        if start == 0:  # fp8 pages: scales from the whole first prompt, before any page is written
            self._set_scales(layer, self._lw_k[:, :end], self._lw_v[:, :end], token_dim=1)
        first = start // P
        self._abstracts_from_staging(layer, first, end)
        self._refresh_chunks(layer, first, end)
        if self.spills:
            self._place_pages(layer, first, -(-end // P), end // P)
        self.tier_ops.write_through(self._lw_k[:, start:end].transpose(0, 1), self._lw_v[:, start:end].transpose(0, 1),
                                    start, self.host_kv[layer], self.host_slot[layer], self.gpu_k[layer],
                                    self.gpu_v[layer], self.cache_slot, self.tag[layer], kv_scale=self.scales(layer))

    def _place_pages(self, layer: int, first: int, n_pages: int, end_full: int) -> None:
        """Spill mode: decide the host set after this prefill, evict old host pages outside it,
        map new host pages, and write new NVMe pages from the staging area (background thread)."""
        d, hkv = self.directory, self.cfg.num_kv_heads
        sinks, recent_from = self._host_plan(n_pages)
        heads = np.arange(hkv)[:, None] * self.max_pages
        cuda = self.device.type == "cuda"
        # Old pages that no longer belong in the host pool (a long follow-up prompt).
        old = (heads + np.arange(sinks, min(first, recent_from))[None, :]).ravel()
        old = old[d.host_map[layer, old] >= 0] if old.size else old
        if old.size:
            if cuda:
                torch.cuda.current_stream(self.device).synchronize()  # their host copies are complete
            rows = self.promoter.host_rows[layer]
            dirty = old[d.nvme_map[layer, old] < 0]
            if dirty.size:
                self.nvme.write(d.assign_nvme(layer, dirty).tolist(), [rows[s] for s in d.host_map[layer, dirty].tolist()])
            slots = d.release_host(layer, old)
            self._set_host_slots(layer, old, np.full(old.size, -1, dtype=np.int32))
            d.recycle(layer, slots)  # later GPU writes into them are stream-ordered after the gather
        new = np.arange(first, n_pages)
        to_host = new[(new < sinks) | (new >= recent_from)]
        to_disk = new[(new >= sinks) & (new < recent_from)]
        host_flats = (heads + to_host[None, :]).ravel()
        host_flats = host_flats[d.host_map[layer, host_flats] < 0]
        d.nvme_map[layer, (heads + new[None, :]).ravel()] = -1  # disk copies of rewritten pages are stale
        if host_flats.size:
            self._set_host_slots(layer, host_flats, d.assign_host(layer, host_flats))
        # Full host pages are written to NVMe too (in the background), so the promoter can later
        # evict them without a write; partial pages still change and are written when evicted.
        full_host = to_host[to_host < end_full]
        room = d.nvme_slots - d.nvme_pages - hkv * to_disk.size  # a small page file: write on eviction
        if full_host.size and hkv * full_host.size <= room:
            flats = (heads + full_host[None, :]).ravel()
            self._spill_from_staging(layer, flats, d.assign_nvme(layer, flats))
        if to_disk.size:
            disk_flats = (heads + to_disk[None, :]).ravel()
            was_host = disk_flats[d.host_map[layer, disk_flats] >= 0]
            nvme_slots = d.assign_nvme(layer, disk_flats)
            self._spill_from_staging(layer, disk_flats, nvme_slots)
            if was_host.size:  # a continuing page that now belongs on disk
                slots = d.release_host(layer, was_host)
                self._set_host_slots(layer, was_host, np.full(was_host.size, -1, dtype=np.int32))
                d.recycle(layer, slots)
        self._mapped_through = max(self._mapped_through, n_pages)

    def _spill_from_staging(self, layer: int, flats: np.ndarray, nvme_slots: np.ndarray) -> None:
        P, used = self.page_size, self.page_bytes
        rows = self.writer.rows_per_buffer
        for i in range(0, flats.size, rows):
            part = flats[i:i + rows]
            h = torch.from_numpy(part // self.max_pages).to(self.device)
            tok = torch.from_numpy(part % self.max_pages).to(self.device)[:, None] * P + torch.arange(P, device=self.device)
            pages = torch.stack((self._lw_k[h[:, None], tok], self._lw_v[h[:, None], tok]), dim=1)
            scale = self.scales(layer)
            pages = encode_pages(pages, None if scale is None else scale[h, 2:, None, None], self.store_dtype)
            buf = self.writer.buffer()
            buf[:part.size, :used].copy_(pages.reshape(part.size, -1).view(torch.uint8), non_blocking=True)
            event = None
            if self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
            self.writer.submit(nvme_slots[i:i + rows], buf, event)
            self.stats.prefill_nvme_pages_written += part.size

    # -- chunk-major prefill (host-only stores) ----------------------------------------------------
    def _stream_buffers(self) -> list:
        if self._staging is None:
            hkv, d, n = self.cfg.num_kv_heads, self.cfg.head_dim, 2 if self.side is not None else 1
            self._staging = [(torch.empty((hkv, self.prefill_block, d), device=self.device, dtype=self.dtype),
                              torch.empty((hkv, self.prefill_block, d), device=self.device, dtype=self.dtype))
                             for _ in range(n)]
        return self._staging

    def _stage_block(self, layer: int, first_page: int, n_pages: int, buf: int) -> None:
        k_st, v_st = self._stream_buffers()[buf]
        slots = self.host_slot[layer][:, first_page:first_page + n_pages].contiguous()
        self.tier_ops.gather_pages_to_staging(self.host_kv[layer], slots, n_pages, k_st, v_st,
                                              kv_scale=self.scales(layer))
        self.stats.prefill_bytes_h2d += k_st.shape[0] * n_pages * self.page_bytes

    def _prefill_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t, start = q.shape[0], self.length
        hkv, g, d, P = self.cfg.num_kv_heads, self.cfg.gqa_group, self.cfg.head_dim, self.page_size
        rows = q.view(t, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * t, d)
        # Self-attention of the chunk (causal), heads expanded: the chunk is small.
        o, lse = attention_with_lse(q.transpose(0, 1).contiguous(),
                                    k.transpose(0, 1).repeat_interleave(g, 0).contiguous(),
                                    v.transpose(0, 1).repeat_interleave(g, 0).contiguous(), True, self.sm_scale)
        acc = RunningAttention(o.view(hkv, g, t, d).reshape(hkv, g * t, d), lse.view(hkv, g * t))
        # The past (exactly `start` tokens: a partial page's newer slots belong to this chunk),
        # in blocks streamed from the host pool.
        block_pages = self.prefill_block // P
        past_pages = -(-start // P)
        blocks = [(p0, min(block_pages, past_pages - p0)) for p0 in range(0, past_pages, block_pages)]
        cuda = self.side is not None
        staging = self._stream_buffers() if blocks else []
        if cuda and blocks:
            main = torch.cuda.current_stream(self.device)
            self.side.wait_stream(main)  # the chunk's host writes land before blocks are read
            self._side_forked = True
            with torch.cuda.stream(self.side):
                self._stage_block(layer, *blocks[0], 0)
                self._staged[0].record(self.side)
        for i, (p0, n) in enumerate(blocks):
            buf = i % 2 if cuda else 0
            if cuda:
                if i + 1 < len(blocks):  # fetch the next block while this one is attended
                    with torch.cuda.stream(self.side):
                        self.side.wait_event(self._consumed[(i + 1) % 2])
                        self._stage_block(layer, *blocks[i + 1], (i + 1) % 2)
                        self._staged[(i + 1) % 2].record(self.side)
                main.wait_event(self._staged[buf])
            else:
                self._stage_block(layer, p0, n, buf)
            k_st, v_st = staging[buf]
            tokens = min(n * P, start - p0 * P)
            acc.add(*attention_with_lse(rows, k_st[:, :tokens], v_st[:, :tokens], False, self.sm_scale))
            if cuda:
                self._consumed[buf].record(main)
        return acc.result(q.dtype).view(hkv, g, t, d).permute(2, 0, 1, 3).reshape(t, hkv * g, d)
