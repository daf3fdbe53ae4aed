"""Where every page lives when it is not (only) in the GPU page cache: its home.

Every page (P tokens of one KV head of one layer, K and V) has a home slot in one pinned host
allocation (``HostPagePool``), written through as tokens arrive. With fewer host slots per layer
than pages (``spills``), the pages between the sinks and the recent ones live in NVMe page files
instead: a ``PageDirectory`` maps each page to its host and NVMe slots, the ``Promoter`` thread
reads selected NVMe-only pages into free host slots (evicting others), and the ``SpillWriter``
writes pages out in the background. Mapping changes reach the GPU's ``host_slot`` table between
decode steps (``apply_promotions``, ``map_pages_through``).
"""
from __future__ import annotations

import numpy as np
import torch

from lcrun.errors import ConfigError
from lcrun.offload.host_pool import HostPagePool
from lcrun.offload.movers import Promoter, SpillWriter
from lcrun.offload.nvme_store import NvmeStore
from lcrun.offload.page_directory import PageDirectory
from lcrun.runtime.tiered.codec import PageCodec
from lcrun.runtime.tiered.config import TierConfig, tier_kernels


class HostHomes:
    """host_kv: (L, H, 2, P, D) store dtype, the host pool's slots (H per layer; K and V side by
    side, each slot padded to 4 KiB for direct I/O); host_slot: (L, Hkv, max_pages) int32 on the
    device, the host slot of each page or -1 while it lives only on NVMe (spill mode)."""

    def __init__(self, conf: TierConfig, codec: PageCodec, host_slots_per_layer: int | None, kv_dir: str | None,
                 nvme_slots: int | None, promotion_reserve: int | None):
        """host_slots_per_layer: host pool pages per layer (default: every page of the context, no
        NVMe tier); below that, pages spill to NVMe files under ``kv_dir`` (``nvme_slots`` pages at
        most, default every page) and ``promotion_reserve`` host slots per layer are kept free for
        promotions and new pages."""
        self.conf = conf
        L, hkv = conf.cfg.num_layers, conf.cfg.num_kv_heads
        flat_pages = hkv * conf.max_pages
        H = flat_pages if host_slots_per_layer is None else min(int(host_slots_per_layer), flat_pages)
        self.spills = H < flat_pages
        self.host_slots_per_layer = H
        self.page_bytes = codec.page_bytes
        self.slot_bytes = -(-self.page_bytes // 4096) * 4096
        self.host_pool = HostPagePool(L * H, self.slot_bytes)
        self.host_kv = self.host_pool.slots_view(codec.store_dtype, codec.page_shape).view(L, H, *codec.page_shape)
        self.kernels = tier_kernels(conf.device)
        self.mapped_through = 0  # pages [0, this) of the context have host slots (spill mode)
        self.reserve = 0
        self.directory = self.nvme = self.writer = self.promoter = None
        if not self.spills:
            # Every page has a fixed home: slot h * max_pages + p of its layer.
            self.host_slot = torch.arange(flat_pages, device=conf.device, dtype=torch.int32).view(
                1, hkv, conf.max_pages).repeat(L, 1, 1).contiguous()
            return
        try:
            self._open_nvme_tier(kv_dir, nvme_slots, promotion_reserve)
        except BaseException:
            self.host_pool.close()
            raise

    def _open_nvme_tier(self, kv_dir: str | None, nvme_slots: int | None, promotion_reserve: int | None) -> None:
        conf, H = self.conf, self.host_slots_per_layer
        L, hkv, P = conf.cfg.num_layers, conf.cfg.num_kv_heads, conf.page_size
        flat_pages = hkv * conf.max_pages
        if kv_dir is None:
            raise ConfigError(f"{H} host pages per layer hold less than the {flat_pages} pages of {conf.capacity} "
                              "tokens: set --kv-dir to a folder on an NVMe drive, or raise --host-mem")
        reserve = promotion_reserve if promotion_reserve is not None else 2 * hkv * max(1, conf.budget // P)
        self.reserve = max(2 * hkv, min(int(reserve), H // 2))
        keep = (H - self.reserve) // hkv   # host pages per head after a prefill
        if keep < -(-conf.sink_tokens // P) + -(-conf.window_tokens // P) + 2:
            raise ConfigError(f"{H} host pages per layer cannot hold the sinks and window of {hkv} KV heads "
                              f"plus a promotion reserve of {self.reserve}: raise --host-mem")
        self.host_slot = torch.full((L, hkv, conf.max_pages), -1, device=conf.device, dtype=torch.int32)
        self.directory = PageDirectory(L, hkv, conf.max_pages, H, nvme_slots or L * flat_pages)
        self.nvme = NvmeStore(kv_dir, self.slot_bytes, self.directory.nvme_slots)
        self.writer = SpillWriter(self.nvme, 64 << 20, buffers=3, pin=conf.cuda)
        host_rows = self.host_pool.slots_view(torch.uint8, (self.slot_bytes,)).view(L, H, self.slot_bytes)
        self.promoter = Promoter(self.directory, self.nvme, host_rows, reserve_per_layer=self.reserve,
                                 protected_fn=self._protected_flats, writer=self.writer, pin=conf.cuda)

    def _protected_flats(self, length: int) -> np.ndarray:
        """Pages never evicted from the host pool: sinks, the local window, the page being written
        and the next one (flat ids, the same for every layer)."""
        P = self.conf.page_size
        pages = np.arange(self.conf.max_pages)
        keep = (pages < -(-self.conf.sink_tokens // P)) | (pages >= max(0, (length - self.conf.window_tokens) // P - 1))
        return np.tile(keep, self.conf.cfg.num_kv_heads)

    # -- the device's host_slot table --------------------------------------------------------------
    def set_host_slots(self, layer: int, flats: np.ndarray, slots: np.ndarray) -> None:
        """host_slot[layer] of flat pages ``flats`` = ``slots`` (-1: the page is no longer in the pool)."""
        idx = torch.from_numpy(np.ascontiguousarray(flats, dtype=np.int64)).to(self.conf.device)
        val = torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int32)).to(self.conf.device)
        self.host_slot[layer].view(-1)[idx] = val

    def unmap(self, layer: int, flats: np.ndarray) -> None:
        """Take host slots from pages ``flats`` (their NVMe copies are current); the slots are free
        once the GPU work queued so far has run (later writes into them are stream-ordered after it)."""
        d = self.directory
        slots = d.release_host(layer, flats)
        self.set_host_slots(layer, flats, np.full(flats.size, -1, dtype=np.int32))
        d.recycle(layer, slots)

    def discard(self, layer: int, flats: np.ndarray) -> None:
        """Forget pages ``flats`` whose contents are obsolete: no write back; their host slots are
        free once the GPU work queued so far has run (as ``unmap``), their disk slots at once."""
        d = self.directory
        pages, slots = d.discard_host(layer, flats)
        if pages.size:
            self.set_host_slots(layer, pages, np.full(pages.size, -1, dtype=np.int32))
            d.recycle(layer, slots)
        d.discard_nvme(layer, flats)

    def map_pages_through(self, end_page: int) -> None:
        """Give pages [mapped_through, end_page) of every layer and head a host slot (new pages of decode)."""
        if end_page <= self.mapped_through:
            return
        flats_all = self.conf.flats(np.arange(self.mapped_through, min(end_page, self.conf.max_pages)))
        d = self.directory
        for layer in range(self.conf.cfg.num_layers):
            flats = flats_all[d.host_map[layer, flats_all] < 0]  # only this thread maps new pages
            if flats.size > d.free_host_slots(layer):
                self._reclaim()
            with d.lock:
                slots = d.assign_host(layer, flats)
            self.set_host_slots(layer, flats, slots)
        self.mapped_through = end_page

    def _reclaim(self) -> None:
        """Free host slots for new pages: the promoter's evictions freed slots that only the GPU's
        pass over their unmap keeps (it recycles them when its next selection comes, which may be
        later than this step). Wait for it to finish, apply what it did, and recycle them now."""
        self.promoter.wait_idle()
        self.apply_promotions()
        self.promoter.recycle_released(wait=True)

    def room_to_promote(self) -> bool:
        """Whether some layer has free host slots beyond the new pages of decode (the promoter's rule)."""
        room = 2 * self.conf.cfg.num_kv_heads
        return any(self.directory.free_host_slots(layer) > room for layer in range(self.conf.cfg.num_layers))

    def apply_promotions(self) -> int:
        """Apply the promoter's mapping changes; returns how many pages gained a host slot."""
        promoted = 0
        for layer, flats, slots, released in self.promoter.drain():
            self.set_host_slots(layer, flats, slots)
            if released is not None:
                event = torch.cuda.Event() if self.conf.cuda else None
                if event is not None:
                    event.record()  # after the unmap: once it completes no step reads the old pages
                self.promoter.released(event, layer, released)
            else:
                promoted += len(flats)
        return promoted

    def settle_movers(self) -> None:
        """Before a prefill: wait for the promoter and apply what it did (the prefill remaps pages)."""
        if self.spills:
            self.promoter.wait_idle()
            self.apply_promotions()

    def quiesce(self) -> None:
        """Spill mode: let the promoter and the spill writer finish (their counts are then final)."""
        self.promoter.wait_idle()
        self.writer.flush()

    # -- reads -------------------------------------------------------------------------------------
    def gather(self, layer: int, n_pages: int, k_out: torch.Tensor, v_out: torch.Tensor,
               kv_scale: torch.Tensor | None) -> None:
        """Pages [0, n_pages) of every KV head of ``layer`` from the host pool into k_out/v_out
        (Hkv, >= n_pages * P, D) model dtype, in one zero-copy gather (fp8 codes decoded with
        ``kv_scale``). Pages not in the pool (host slot -1) read slot 0: the caller overwrites them."""
        table = self.host_slot[layer][:, :n_pages].clamp(min=0).contiguous()
        self.kernels.gather_pages_to_staging(self.host_kv[layer], table, n_pages, k_out, v_out, kv_scale=kv_scale)

    def not_in_pool(self, layer: int, flats: np.ndarray) -> np.ndarray:
        """Those of flat pages ``flats`` of ``layer`` without a host slot (spill mode)."""
        return flats[self.directory.host_map[layer, flats] < 0]

    def host_pages(self, length: int) -> int:
        """Pages in the host pool, every layer, with ``length`` tokens cached."""
        if self.spills:
            return int((self.directory.host_map >= 0).sum())
        cfg = self.conf.cfg
        return cfg.num_layers * cfg.num_kv_heads * -(-length // self.conf.page_size)

    def device_bytes(self) -> int:
        return self.host_slot.numel() * self.host_slot.element_size()

    def close(self) -> None:
        if self.spills:
            for closer in (self.promoter.close, self.writer.close, self.nvme.close):
                try:
                    closer()
                except Exception:
                    pass
        self.host_pool.close()
