"""Background movers between the host pool and the NVMe tier.

``SpillWriter``: prefill hands it pinned buffers of full pages (copied from the GPU on the compute
stream, with an event); one thread waits for each copy and writes the pages to their NVMe slots,
so disk writes overlap the next layer's compute. A bounded ring of buffers gives back-pressure
when the disk is slower than the GPU.

``Promoter``: after each decode step the cache hands it the step's selection (copied to pinned
memory, with an event). One thread marks the selected pages as used, reads the selected pages that
live only on NVMe into free host slots (one batch per step, spread by the store over its I/O
threads so that many reads are in flight), and keeps a reserve of free slots by releasing the
least recently used pages. It never touches the GPU mapping: it queues mapping changes, which the
cache applies between steps (``drain``), and it reuses a released slot only after the cache
reports an event recorded after the unmap has completed (no step can still read the old page
there). Each handed-over selection gets a number (``submit``); ``wait_promoted`` blocks, with a
bound, until that selection's promotions are queued, which is what a cache waits for before it
runs again a step that found selected pages still on NVMe. Pages a selection could not promote
for want of free slots are ``deferred``: its waiter wakes after the evictions that make room, and
hands the selection over again once it has recycled their slots (``recycle_released``).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lcrun.offload.nvme_store import NvmeStore
from lcrun.offload.page_directory import PageDirectory


def _wait(event) -> None:
    if event is not None:
        event.synchronize()


class _JobThread:
    """A daemon thread that runs ``_process(*job)`` for each queued job, in order; the first error
    stops the work and is re-raised on the main thread by ``check``."""

    def __init__(self, name: str):
        self._name = name
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def _process(self, *job) -> None:
        raise NotImplementedError

    def _finish(self, job) -> None:
        """Runs after each job, failed or not."""

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                self._jobs.task_done()
                return
            try:
                if self._error is None:
                    self._process(*job)
            except BaseException as exc:  # reported to the main thread by check()
                self._error = exc
            finally:
                self._finish(job)
                self._jobs.task_done()

    def wait_idle(self) -> None:
        """Block until every queued job is done; re-raises a thread error."""
        self._jobs.join()
        self.check()

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()


class SpillWriter(_JobThread):
    """Writes (nvme_slots, pinned uint8 rows) batches on a thread; buffers come from a ring."""

    def __init__(self, store: NvmeStore, buffer_bytes: int, buffers: int = 3, pin: bool = True):
        super().__init__("lcrun-spill")
        self.store = store
        self.rows_per_buffer = max(1, buffer_bytes // store.slot_bytes)
        self._free: queue.Queue = queue.Queue()
        for _ in range(buffers):
            buf = torch.empty((self.rows_per_buffer, store.slot_bytes), dtype=torch.uint8, pin_memory=pin)
            self._free.put(buf)
        self.bytes_written = 0
        self._start_thread()

    def buffer(self) -> torch.Tensor:
        """A free pinned (rows_per_buffer, slot_bytes) uint8 buffer (blocks while all are in use)."""
        self.check()
        return self._free.get()

    def give_back(self, buf: torch.Tensor) -> None:
        """Return a buffer taken with ``buffer`` and not submitted."""
        self._free.put(buf)

    def submit(self, slots: np.ndarray, buf: torch.Tensor, event) -> None:
        """Write rows [0, len(slots)) of ``buf`` to ``slots`` once ``event`` (the copy) completes."""
        self.check()
        self._jobs.put((slots, buf, event))

    def flush(self) -> None:
        """Block until every submitted write is on disk; re-raises a writer error."""
        self.wait_idle()

    def _process(self, slots: np.ndarray, buf: torch.Tensor, event) -> None:
        _wait(event)
        self.store.write(slots.tolist(), buf[:len(slots)])
        self.bytes_written += len(slots) * self.store.slot_bytes

    def _finish(self, job) -> None:
        self._free.put(job[1])  # the buffer goes back to the ring even when the write failed


@dataclass
class PromoterStats:
    steps_seen: int = 0
    steps_dropped: int = 0          # selections not handed over because the promoter was behind
    promoted_pages: int = 0
    evicted_pages: int = 0
    victims_written: int = 0        # evicted pages that had no NVMe copy yet
    nvme_read_bytes: int = 0
    nvme_write_bytes: int = 0
    busy_s: float = 0.0
    per_step: list = field(default_factory=list)  # (step, promoted pages) for reports


class Promoter(_JobThread):
    """One thread that promotes selected NVMe pages into the host pool, one step behind decode."""

    def __init__(self, directory: PageDirectory, store: NvmeStore, host_rows: torch.Tensor, *,
                 reserve_per_layer: int, protected_fn, ring: int = 3, pin: bool = True,
                 writer: SpillWriter | None = None):
        """host_rows: (num_layers, host_slots_per_layer, slot_bytes) uint8 view of the host pool.
        protected_fn(step_length) -> (num_layers?, flat_pages) bool mask of pages never evicted."""
        super().__init__("lcrun-promote")
        self.dir, self.store, self.host_rows = directory, store, host_rows
        self.reserve = reserve_per_layer
        self.protected_fn = protected_fn
        self.writer = writer
        self.stats = PromoterStats()
        self._ring_free: queue.Queue = queue.Queue()
        self.sel_buffers = []
        self._ring_size = ring
        self._pin = pin
        self._updates: queue.Queue = queue.Queue()      # to the main thread: see drain()
        self._recycle: list = []                        # (event, layer, slots) released, awaiting GPU
        self._recycle_lock = threading.Lock()
        self._submitted = 0                             # selections handed over (their numbers: 1, 2, ...)
        self._promoted_through = 0                      # every selection up to this one has its promotions queued
        self._progress = threading.Condition()
        self._deferred = (0, 0)                         # (selection number, pages it left on NVMe)

    def start(self, sel_shape: tuple[int, ...]) -> None:
        # Normal tensors even when called inside inference mode: graph replays write them outside it.
        with torch.inference_mode(False):
            for i in range(self._ring_size):
                self.sel_buffers.append(torch.empty(sel_shape, dtype=torch.int32, pin_memory=self._pin))
                self._ring_free.put(i)
        self._start_thread()

    # -- main thread ---------------------------------------------------------------------------
    def free_buffer(self, timeout: float = 0.0) -> int | None:
        """Index of a selection buffer to copy into, waiting up to ``timeout`` seconds for one, or
        None when the promoter is that far behind (the caller counts ``steps_dropped``)."""
        self.check()
        try:
            return self._ring_free.get(timeout=timeout) if timeout > 0 else self._ring_free.get_nowait()
        except queue.Empty:
            return None

    def submit(self, step: int, length: int, buf: int, event) -> int:
        """Hand over the selection in ``sel_buffers[buf]`` (complete once ``event`` does); returns
        its number for ``wait_promoted``."""
        self._submitted += 1
        self._jobs.put((self._submitted, step, length, buf, event))
        return self._submitted

    def wait_promoted(self, seq: int, timeout: float) -> bool:
        """Block until the promotions of selection ``seq`` (and every earlier one) are queued for
        ``drain``, at most ``timeout`` seconds; whether they are. Re-raises a promoter error."""
        with self._progress:
            done = self._progress.wait_for(lambda: self._promoted_through >= seq or self._error is not None,
                                           timeout=max(0.0, timeout))
        self.check()
        return done

    def drain(self) -> list[tuple]:
        """Mapping changes ready to apply on the GPU: (layer, flat page ids, new host slots or -1,
        released slots or None). The caller reports released slots back through ``released``."""
        self.check()
        out = []
        while True:
            try:
                out.append(self._updates.get_nowait())
            except queue.Empty:
                return out

    def released(self, event, layer: int, slots: np.ndarray) -> None:
        """The cache unmapped ``slots`` on the GPU; they are free once ``event`` completes."""
        with self._recycle_lock:
            self._recycle.append((event, layer, slots))

    # -- the thread ----------------------------------------------------------------------------
    def recycle_released(self, wait: bool = False) -> None:
        """Free the released slots whose unmap the GPU has passed (``wait``: wait for those events
        instead of skipping the ones not yet complete). Either thread may call it."""
        with self._recycle_lock:
            pending, self._recycle = self._recycle, []
        keep = []
        for event, layer, slots in pending:
            if event is not None and wait:
                event.synchronize()
            if event is None or wait or event.query():
                with self.dir.lock:
                    self.dir.recycle(layer, slots)
            else:
                keep.append((event, layer, slots))
        with self._recycle_lock:
            self._recycle = keep + self._recycle

    def deferred(self, seq: int) -> int:
        """Selected NVMe pages that selection ``seq`` could not promote for want of free host slots
        (its evictions free them for the next hand-over); 0 once a later selection was processed."""
        with self._progress:
            return self._deferred[1] if self._deferred[0] == seq else 0

    def _mark_promoted(self, seq: int) -> None:
        with self._progress:
            self._promoted_through = max(self._promoted_through, seq)
            self._progress.notify_all()

    def _finish(self, job) -> None:
        self._mark_promoted(job[0])  # a failed job too: its waiter then sees the error

    def _process(self, seq: int, step: int, length: int, buf: int, event) -> None:
        _wait(event)
        sel = self.sel_buffers[buf].numpy().copy()     # (L, Hkv, K): page ids, -1 where unused
        self._ring_free.put(buf)
        t0 = time.perf_counter()
        self.stats.steps_seen += 1
        self.recycle_released()
        d = self.dir
        heads = np.arange(sel.shape[1], dtype=np.int64)[:, None] * d.max_pages
        protected = self.protected_fn(length)
        if self.writer is not None:
            self.writer.flush()  # pages spilled by prefill must be on disk before they are read back
        # One batch of reads for all layers (the store spreads it over its I/O threads).
        found, reads, rows, deferred = [], [], [], 0
        for layer in range(sel.shape[0]):
            used = sel[layer] >= 0
            flats = np.unique((sel[layer] + heads)[used])
            with d.lock:
                d.last_used[layer, flats] = step
                wanted = flats[(d.host_map[layer, flats] < 0) & (d.nvme_map[layer, flats] >= 0)]
                # Leave room for the new pages decode writes (two per head) before the next drain.
                missing = wanted[:max(0, d.free_host_slots(layer) - 2 * sel.shape[1])]
                deferred += wanted.size - missing.size
                slots = d.assign_host(layer, missing) if missing.size else missing[:0].astype(np.int32)
                reads += d.nvme_map[layer, missing].tolist()
            rows += [self.host_rows[layer, s] for s in slots.tolist()]
            found.append((layer, flats, missing, slots))
        if reads:
            self.store.read_into_sync(reads, rows)
            self.stats.nvme_read_bytes += len(reads) * self.store.slot_bytes
        for layer, flats, missing, slots in found:
            if missing.size:
                self._updates.put((layer, missing, slots, None))
        with self._progress:
            self._deferred = (seq, deferred)
        if not deferred:  # a waiting step can run again now; the reserve is kept meanwhile
            self._mark_promoted(seq)  # (else _finish wakes it after the evictions that make room)
        for layer, flats, missing, slots in found:
            self._keep_reserve(layer, protected, flats)
        self.stats.promoted_pages += len(reads)
        self.stats.per_step.append((step, len(reads)))
        self.stats.busy_s += time.perf_counter() - t0

    def _keep_reserve(self, layer: int, protected: np.ndarray, selected: np.ndarray) -> None:
        d = self.dir
        with self._recycle_lock:
            pending = sum(len(s) for _, lay, s in self._recycle if lay == layer)
        with d.lock:
            short = self.reserve - d.free_host_slots(layer) - pending
            if short <= 0:
                return
            mask = protected.copy()
            mask[selected] = True  # what this step read stays: it is likely read again next step
            # Clean pages first (their NVMe copy is current: evicting them writes nothing).
            victims = d.eviction_victims(layer, short, mask | (d.nvme_map[layer] < 0))
            if victims.size < short:
                mask[victims] = True
                victims = np.concatenate((victims, d.eviction_victims(layer, short - victims.size, mask)))
            dirty = victims[d.nvme_map[layer, victims] < 0]
            nvme_slots = d.assign_nvme(layer, dirty) if dirty.size else None
            dirty_host = d.host_map[layer, dirty].copy()
        if dirty.size:
            # Full pages written through long ago: the step this selection came from has finished,
            # so every GPU store into them has landed.
            self.store.write(nvme_slots.tolist(), [self.host_rows[layer, s] for s in dirty_host.tolist()])
            self.stats.victims_written += dirty.size
            self.stats.nvme_write_bytes += dirty.size * self.store.slot_bytes
        if victims.size:
            with d.lock:
                old = d.release_host(layer, victims)
            self.stats.evicted_pages += victims.size
            self._updates.put((layer, victims, np.full(victims.size, -1, dtype=np.int32), old))
