"""Where a prefill's pages go in spill mode, and how its staged past comes back from NVMe.

After a prompt, each layer keeps in the host pool the sinks and as many of the most recent pages
as fit beside the promotion reserve; the pages between live on NVMe, written by a background
thread (the SpillWriter) from the prefill's staging area while the next layer computes.
"""
from __future__ import annotations

import numpy as np
import torch

from lcrun.runtime.tiered.codec import PageCodec
from lcrun.runtime.tiered.homes import HostHomes
from lcrun.runtime.tiered.stats import TierStats


class SpillPlacement:
    """Spill mode only. Staging: k, v (Hkv, capacity, D) model dtype, post-RoPE keys."""

    def __init__(self, homes: HostHomes, codec: PageCodec, stats: TierStats):
        self.homes, self.codec, self.stats = homes, codec, stats
        self.conf = homes.conf

    def _tokens(self, flats: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat page ids (n,) -> their KV heads (n,) and token indices (n, P) on the device."""
        P, dev, max_pages = self.conf.page_size, self.conf.device, self.conf.max_pages
        heads = torch.from_numpy(flats // max_pages).to(dev)
        tok = torch.from_numpy(flats % max_pages).to(dev)[:, None] * P + torch.arange(P, device=dev)
        return heads, tok

    def read_spilled(self, layer: int, n_pages: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Pages [0, n_pages) of ``layer`` that live only on NVMe, into the staging area through a
        pinned bounce buffer (the host-pool pages are gathered by the caller)."""
        h = self.homes
        on_disk = h.not_in_pool(layer, self.conf.flats(np.arange(n_pages)))
        if on_disk.size == 0:
            return
        h.writer.flush()
        rows = h.writer.rows_per_buffer
        for i in range(0, on_disk.size, rows):
            part = on_disk[i:i + rows]
            buf = h.writer.buffer()
            try:
                h.nvme.read_into_sync(h.directory.nvme_map[layer, part].tolist(), buf[:part.size])
                heads, tok = self._tokens(part)
                pages = self.codec.from_bytes(buf[:part.size].to(self.conf.device, non_blocking=True), layer, heads)
                k[heads[:, None], tok] = pages[:, 0]
                v[heads[:, None], tok] = pages[:, 1]
                if self.conf.cuda:
                    torch.cuda.current_stream(self.conf.device).synchronize()  # the bounce is reused next
            finally:
                h.writer.give_back(buf)
            self.stats.prefill_nvme_read_bytes += part.size * h.slot_bytes

    def host_plan(self, n_pages: int) -> tuple[int, int]:
        """Pages per head that stay in the host pool after a prefill: [0, sinks) and
        [recent_from, n_pages); the pages between live on NVMe."""
        h = self.homes
        keep = (h.host_slots_per_layer - h.reserve) // self.conf.cfg.num_kv_heads
        sinks = min(-(-self.conf.sink_tokens // self.conf.page_size), keep)
        return sinks, max(sinks, n_pages - (keep - sinks))

    def place(self, layer: int, first: int, n_pages: int, end_full: int, k: torch.Tensor, v: torch.Tensor,
              continuing: bool) -> None:
        """After a layer's prefill of pages [first, n_pages) (pages below ``end_full`` full; the
        first one ``continuing`` a page begun before): decide the host set, evict old host pages
        outside it, map new host pages, and write new NVMe pages from the staging area k, v
        (background thread)."""
        h, d, hkv = self.homes, self.homes.directory, self.conf.cfg.num_kv_heads
        sinks, recent_from = self.host_plan(n_pages)
        # What an earlier, longer or different sequence left from ``first`` on is obsolete: its disk
        # copies, and its host slots past a continuing page (which keeps the tokens it already had).
        stale = self.conf.flats(np.arange(first, self.conf.max_pages))
        if (d.nvme_map[layer, stale] >= 0).any():
            h.writer.flush()  # no queued write may land in a slot after it is reused
        h.discard(layer, self.conf.flats(np.arange(first + int(continuing), self.conf.max_pages)))
        d.discard_nvme(layer, stale)  # the continuing page's disk copy too
        # Old pages that no longer belong in the host pool (a long follow-up prompt).
        old = self.conf.flats(np.arange(sinks, min(first, recent_from)))
        old = old[d.host_map[layer, old] >= 0] if old.size else old
        if old.size:
            if self.conf.cuda:
                torch.cuda.current_stream(self.conf.device).synchronize()  # their host copies are complete
            rows = h.promoter.host_rows[layer]
            dirty = old[d.nvme_map[layer, old] < 0]
            if dirty.size:
                h.nvme.write(d.assign_nvme(layer, dirty).tolist(), [rows[s] for s in d.host_map[layer, dirty].tolist()])
            h.unmap(layer, old)
        new = np.arange(first, n_pages)
        to_host = new[(new < sinks) | (new >= recent_from)]
        to_disk = new[(new >= sinks) & (new < recent_from)]
        host_flats = h.not_in_pool(layer, self.conf.flats(to_host))
        if host_flats.size:
            h.set_host_slots(layer, host_flats, d.assign_host(layer, host_flats))
        # Full host pages are written to NVMe too (in the background), so the promoter can later
        # evict them without a write; partial pages still change and are written when evicted.
        full_host = to_host[to_host < end_full]
        room = d.nvme_slots - d.nvme_pages - hkv * to_disk.size  # a small page file: write on eviction
        if full_host.size and hkv * full_host.size <= room:
            flats = self.conf.flats(full_host)
            self._spill(layer, flats, d.assign_nvme(layer, flats), k, v)
        if to_disk.size:
            disk_flats = self.conf.flats(to_disk)
            was_host = disk_flats[d.host_map[layer, disk_flats] >= 0]
            self._spill(layer, disk_flats, d.assign_nvme(layer, disk_flats), k, v)
            if was_host.size:  # a continuing page that now belongs on disk
                h.unmap(layer, was_host)
        h.mapped_through = n_pages

    def _spill(self, layer: int, flats: np.ndarray, nvme_slots: np.ndarray, k: torch.Tensor, v: torch.Tensor) -> None:
        """Pages ``flats`` from the staging area to NVMe slots ``nvme_slots`` (background writes)."""
        writer, used = self.homes.writer, self.codec.page_bytes
        rows = writer.rows_per_buffer
        for i in range(0, flats.size, rows):
            part = flats[i:i + rows]
            heads, tok = self._tokens(part)
            pages = torch.stack((k[heads[:, None], tok], v[heads[:, None], tok]), dim=1)
            buf = writer.buffer()
            buf[:part.size, :used].copy_(self.codec.to_bytes(pages, layer, heads), non_blocking=True)
            event = None
            if self.conf.cuda:
                event = torch.cuda.Event()
                event.record()
            writer.submit(nvme_slots[i:i + rows], buf, event)
            self.stats.prefill_nvme_pages_written += part.size
