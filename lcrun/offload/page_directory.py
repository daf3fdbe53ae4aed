"""Where each KV page lives below the GPU: a host pool slot, an NVMe slot, or both.

Plain numpy, owned by the host side of the tiered cache (the GPU sees only ``host_slot``, which the
cache updates from this directory between decode steps). Pages are identified per layer by their
flat id ``head * max_pages + page``. A full page never changes, so once it has an NVMe copy its
host slot can be dropped without writing anything back.

Host slots of a layer cycle through three states: free -> mapped (a page lives there) ->
released (unmapped on the host side, but a GPU step queued earlier may still read it) -> free
again once the cache says the GPU has passed the unmap (``recycle``).
"""
from __future__ import annotations

import threading

import numpy as np

from lcrun.errors import CapacityError


class PageDirectory:
    def __init__(self, num_layers: int, num_heads: int, max_pages: int, host_slots_per_layer: int,
                 nvme_slots: int):
        self.num_layers, self.num_heads, self.max_pages = num_layers, num_heads, max_pages
        self.flat_pages = num_heads * max_pages
        self.host_slots_per_layer = host_slots_per_layer
        self.host_map = np.full((num_layers, self.flat_pages), -1, dtype=np.int32)
        self.nvme_map = np.full((num_layers, self.flat_pages), -1, dtype=np.int64)
        self.last_used = np.zeros((num_layers, self.flat_pages), dtype=np.int64)
        # Free host slots per layer as a stack (the top is the end of the array).
        self._free = [np.arange(host_slots_per_layer - 1, -1, -1, dtype=np.int32) for _ in range(num_layers)]
        self._nfree = [host_slots_per_layer] * num_layers
        self.nvme_slots = nvme_slots
        self._nvme_next = 0
        self._nvme_free: list[int] = []  # slots of discarded pages, reused before new ones
        self.lock = threading.Lock()  # the promoter thread and the main thread both edit maps

    # -- host slots ----------------------------------------------------------------------------
    def free_host_slots(self, layer: int) -> int:
        return self._nfree[layer]

    def assign_host(self, layer: int, flats: np.ndarray) -> np.ndarray:
        """Give each page in ``flats`` (not host-resident) a free host slot; returns the slots."""
        n = len(flats)
        if n > self._nfree[layer]:
            raise CapacityError(f"layer {layer}: {n} pages need host slots but {self._nfree[layer]} are free: "
                                "raise --host-mem")
        top = self._nfree[layer]
        slots = self._free[layer][top - n:top][::-1].copy()
        self._nfree[layer] = top - n
        assert (self.host_map[layer, flats] < 0).all(), "a page was given a second host slot"
        self.host_map[layer, flats] = slots
        return slots

    def release_host(self, layer: int, flats: np.ndarray) -> np.ndarray:
        """Unmap pages from their host slots (each must have an NVMe copy); returns the slots, which
        stay unusable until ``recycle``."""
        slots = self.host_map[layer, flats].copy()
        assert (slots >= 0).all(), "releasing a page that is not in the host pool"
        assert (self.nvme_map[layer, flats] >= 0).all(), "releasing a page with no NVMe copy would lose it"
        self.host_map[layer, flats] = -1
        return slots

    def recycle(self, layer: int, slots: np.ndarray) -> None:
        """Released slots the GPU can no longer read become free."""
        n, top = len(slots), self._nfree[layer]
        self._free[layer][top:top + n] = slots[::-1]
        self._nfree[layer] = top + n

    # -- NVMe slots ----------------------------------------------------------------------------
    def assign_nvme(self, layer: int, flats: np.ndarray) -> np.ndarray:
        """NVMe slots for pages that have none yet (a page is written to disk at most once while
        its contents stay the same); slots of discarded pages first."""
        n = len(flats)
        reused = min(n, len(self._nvme_free))
        if self._nvme_next + n - reused > self.nvme_slots:
            raise CapacityError(f"the NVMe tier's {self.nvme_slots} page slots are used up: raise --host-mem "
                                "or lower --ctx")
        assert (self.nvme_map[layer, flats] < 0).all(), "a page was given a second NVMe slot"
        slots = np.empty(n, dtype=np.int64)
        if reused:
            slots[:reused] = self._nvme_free[-reused:]
            del self._nvme_free[-reused:]
        slots[reused:] = np.arange(self._nvme_next, self._nvme_next + n - reused)
        self._nvme_next += n - reused
        self.nvme_map[layer, flats] = slots
        return slots

    def discard_nvme(self, layer: int, flats: np.ndarray) -> None:
        """Pages whose disk copies are obsolete (rewritten, or past the sequence's end): their NVMe
        slots are free at once (the caller has flushed the writes queued to them)."""
        slots = self.nvme_map[layer, flats]
        self._nvme_free.extend(slots[slots >= 0].tolist())
        self.nvme_map[layer, flats] = -1

    def discard_host(self, layer: int, flats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unmap pages whose contents are obsolete, written back nowhere; returns the pages that had
        host slots and those slots, which stay unusable until ``recycle``."""
        slots = self.host_map[layer, flats]
        held = slots >= 0
        self.host_map[layer, flats[held]] = -1
        return flats[held], slots[held].copy()

    @property
    def nvme_pages(self) -> int:
        """Pages with a copy on disk (every layer)."""
        return self._nvme_next - len(self._nvme_free)

    # -- policy --------------------------------------------------------------------------------
    def eviction_victims(self, layer: int, n: int, protected: np.ndarray) -> np.ndarray:
        """Up to ``n`` host-resident pages, least recently selected first, never a ``protected``
        one (bool mask over flat ids: sinks, the local window, pages being promoted)."""
        resident = np.flatnonzero((self.host_map[layer] >= 0) & ~protected)
        if n <= 0 or resident.size == 0:
            return resident[:0]
        if resident.size > n:
            order = np.argpartition(self.last_used[layer, resident], n - 1)[:n]
            resident = resident[order]
        return resident.astype(np.int64)

    def host_resident(self, layer: int) -> np.ndarray:
        return self.host_map[layer] >= 0
