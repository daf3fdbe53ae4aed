"""The NVMe tier in the decode loop: late pages wait, and the step runs again.

Every step's selection goes to the Promoter thread, which reads its pages that live only on NVMe
into the host pool (many reads in flight), so the next step -- whose selection is mostly the
same -- finds them there. Inside a step nothing waits for the disk: a selected page still on NVMe
(host slot -1) is unreadable, and the kernels treat it as empty. So after each decode step the
caller asks ``settle_decode_step``: when the step found selected pages unreadable ("late"), the
cache waits for the promoter to bring that step's selection in (at most NVME_WAIT_MS per token,
LCRUN_NVME_WAIT_MS), maps the promoted pages, forgets the step's token and answers True, and the
caller runs the same step again (same token and position: writing the same K/V again and the
running min/max abstracts are idempotent), which now reads them. A redo can change what later
layers select, so a token is run at most 1 + NVME_MAX_REDOS times (LCRUN_NVME_MAX_REDOS); pages
still unreadable in the step that is kept are "skipped", and the report counts both.
"""
from __future__ import annotations

import time

import torch

from lcrun.runtime.tiered.config import capturing
from lcrun.runtime.tiered.homes import HostHomes
from lcrun.runtime.tiered.stats import TierStats
from lcrun.units import env_number

# How long one token may wait for late pages in all (ms), and how many times its step may run
# again. A wait of 0 never redoes a step (late pages are skipped).
NVME_WAIT_MS = 200.0
NVME_MAX_REDOS = 3




class DecodeSettler:
    """Between decode steps, in spill mode (a no-op otherwise): promotions applied and new pages
    mapped before a step, its selection handed to the promoter after it, and the late-page settle."""

    def __init__(self, homes: HostHomes, stats: TierStats):
        self.homes, self.stats = homes, stats
        self.active = homes.spills
        self.wait_s = env_number("LCRUN_NVME_WAIT_MS", NVME_WAIT_MS) / 1e3
        self.max_redos = int(env_number("LCRUN_NVME_MAX_REDOS", NVME_MAX_REDOS))
        self.sel_log: torch.Tensor | None = None   # (L, Hkv, Kmax) int32 this step's selection, -1 unused
        self._counters_mark = torch.zeros_like(stats.counters)  # ``counters`` before this step
        self._pending = False          # a decode step ran and was not settled yet
        self._sel_seq: int | None = None  # the promoter's number of this step's selection, if handed over
        self._redos = 0                # times the current token's step ran again
        self._redo_length = -1         # length with the redone token: the same token's
        self._deadline = 0.0

    def before_step(self, length: int) -> None:
        """Host work between steps (never inside a capture): apply promotions and evictions, and
        map the page this step writes and the next one (a captured step skips this hook); note
        the counters before the step (``settle`` reads what the step added)."""
        if not self.active or capturing():
            return
        self.homes.apply_promotions()
        self.homes.map_pages_through(-(-(length + 2) // self.homes.conf.page_size))
        self._counters_mark.copy_(self.stats.counters)

    def log_selection(self, layer: int, pages: torch.Tensor, lens: torch.Tensor) -> None:
        """Inside the step (graph-capturable): layer's selection, pages and lens (Hkv, Kmax) int32."""
        if not self.active:
            return
        if self.sel_log is None:
            conf = self.homes.conf
            self.sel_log = torch.full((conf.cfg.num_layers, *pages.shape), -1, device=conf.device, dtype=torch.int32)
        self.sel_log[layer].copy_(torch.where(lens > 0, pages, -1))

    def after_forward(self, decode: bool, length: int) -> None:
        """After every forward: a decode step's selection goes to the promoter (copied to pinned
        memory, no wait) and the step awaits ``settle``."""
        self._pending = decode and self.active
        if not self._pending:
            return
        self._sel_seq = None
        if self.sel_log is None or capturing():
            return  # a captured step: settle hands it over after the replay
        self._sel_seq = self._submit_selection(0.0, length)
        if self._sel_seq is None:
            self.homes.promoter.stats.steps_dropped += 1

    def _submit_selection(self, timeout: float, length: int) -> int | None:
        """Copy the last step's selection to a free promoter buffer (waiting up to ``timeout`` s
        for one) and hand it over; its number, or None when no buffer came free."""
        promoter = self.homes.promoter
        if not promoter.sel_buffers:
            promoter.start(tuple(self.sel_log.shape))
        buf = promoter.free_buffer(timeout)
        if buf is None:
            return None
        promoter.sel_buffers[buf].copy_(self.sel_log, non_blocking=True)
        event = None
        if self.homes.conf.cuda:
            event = torch.cuda.Event()
            event.record()
        return promoter.submit(self.stats.decode_steps, length, buf, event)

    def settle(self, length: int) -> bool:
        """After each decode step (one host sync, a read of five counters), with ``length`` tokens
        cached: True when the step read selected pages that were still on NVMe and must run again
        (the promoter has brought them into the host pool and they are mapped; the caller forgets
        the step's token). False: keep the step's result (every selected page was read, or the
        wait bound or max_redos was reached: the pages left unreadable count as skipped)."""
        if not self._pending:
            return False
        self._pending = False
        if self.sel_log is None:
            return False
        stats = self.stats
        now, mark = stats.counters.tolist(), self._counters_mark.tolist()
        unreadable = now[2] - mark[2]
        if self._redos and length != self._redo_length:
            self._redos = 0  # the redone token was abandoned: this step is a new token's
        if not self._redos:  # the token's first run
            stats.late_pages += unreadable
            self._deadline = time.perf_counter() + self.wait_s
        if unreadable and self.wait_s > 0 and self._redos < self.max_redos and self._wait_for_promotions(length):
            stats.redo_counters = tuple(r + a - b for r, a, b in zip(stats.redo_counters, now, mark))
            stats.counters.copy_(self._counters_mark)  # the run again counts the step
            stats.decode_steps -= 1
            stats.redone_steps += 1
            self._redos += 1
            self._redo_length = length
            return True
        stats.skipped_settled += unreadable
        self._redos = 0
        self._counters_mark.copy_(stats.counters)
        return False

    def _wait_for_promotions(self, length: int) -> int:
        """Wait, until the token's deadline, for the promoter to promote the last step's selection
        (handed over now if it was not after the step), and map what it promoted; how many pages.
        When the pool had no room for some of them, the promoter evicted others first: their slots
        are recycled and the same selection is handed over again."""
        t0 = time.perf_counter()
        homes, promoted = self.homes, 0
        try:
            while True:
                if self._sel_seq is None:  # the promoter was behind, the step was a graph capture, or a retry
                    self._sel_seq = self._submit_selection(max(0.0, self._deadline - time.perf_counter()), length)
                if self._sel_seq is None or not homes.promoter.wait_promoted(
                        self._sel_seq, self._deadline - time.perf_counter()):
                    return promoted
                promoted += homes.apply_promotions()
                if not homes.promoter.deferred(self._sel_seq) or time.perf_counter() >= self._deadline:
                    return promoted
                homes.promoter.recycle_released(wait=True)
                if not homes.room_to_promote():
                    return promoted  # the selection is larger than the pool: the rest is skipped
                self._sel_seq = None
        finally:
            self.stats.nvme_wait_s += time.perf_counter() - t0
