"""The tiered store's counters, and the reports built from them (``report`` after a run,
``step_counters`` between steps for lcrun profile)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lcrun.runtime.tiered.homes import HostHomes


@dataclass
class TierStats:
    """Device-side counters (read once, at report time: no sync in the loop). ``counters`` (5,)
    int64 is what the demand and speculative admission kernels add to
    (lcrun.kernels.tiered.admit_pages): selected pages, GPU cache hits, unreadable (on NVMe only,
    skipped that step), hits brought in by this step's speculative prefetch, pages the prefetch
    admitted."""
    counters: torch.Tensor
    decode_steps: int = 0
    prefill_bytes_h2d: int = 0
    prefill_nvme_read_bytes: int = 0
    prefill_nvme_pages_written: int = 0
    # NVMe tier, host side (settle_decode_step). ``counters`` and ``decode_steps`` count the run of
    # each token that was kept; a run done again is taken out of them and added to redo_counters.
    redone_steps: int = 0              # runs done again because they read pages that arrived late
    late_pages: int = 0                # settled tokens: selected pages unreadable in their first run
    skipped_settled: int = 0           # settled tokens: pages still unreadable in the kept run
    nvme_wait_s: float = 0.0           # time spent waiting for late pages
    redo_counters: tuple = (0, 0, 0, 0, 0)  # ``counters`` of the runs done again

    selected = property(lambda self: self.counters[0])
    hits = property(lambda self: self.counters[1])
    unreadable = property(lambda self: self.counters[2])
    prefetch_hits = property(lambda self: self.counters[3])
    prefetched = property(lambda self: self.counters[4])

    def all_late_pages(self, skipped: int) -> int:
        """Late pages of every token: settled ones, plus the skipped pages of steps nobody settled."""
        return self.late_pages + skipped - self.skipped_settled

    def redo_host_reads(self) -> int:
        """Host reads of the runs done again (their selected pages, less hits and unreadable)."""
        redo = self.redo_counters
        return redo[0] - redo[1] - redo[2]


def report(stats: TierStats, homes: HostHomes, *, prefetch: tuple[str, str | None], store: dict,
           wait_bound: tuple[float, int]) -> dict:
    """Hit rate and bytes moved (syncs, and waits for the NVMe movers: call after a run).
    prefetch: (mode, decision); store: facts about the store placed after the prefetch keys;
    wait_bound: (seconds, redos) each token may wait for late pages (NVMe tier)."""
    selected, hits, skipped = int(stats.selected), int(stats.hits), int(stats.unreadable)
    prefetched, prefetch_hits = int(stats.prefetched), int(stats.prefetch_hits)
    page_bytes, steps = homes.page_bytes, max(1, stats.decode_steps)
    # decode_steps, selected_pages, cache_hits: the kept run of each token (a step run again
    # for late pages counts once; the runs done again are in redone_steps and the redo bytes).
    out = {"decode_steps": stats.decode_steps, "selected_pages": selected, "cache_hits": hits,
           "hit_rate": hits / selected if selected else None,
           "h2d_bytes_per_token_attention": (selected - hits) * page_bytes / steps,
           "h2d_bytes_per_token_redo": stats.redo_host_reads() * page_bytes / steps,
           "prefetched_pages": prefetched, "prefetch_hits": prefetch_hits,
           "prefetch_accuracy": prefetch_hits / prefetched if prefetched else None,
           "prefetch": prefetch[0], "prefetch_decision": prefetch[1],
           "h2d_bytes_per_token_prefetch": prefetched * page_bytes / steps,
           "prefill_h2d_bytes": stats.prefill_bytes_h2d, **store,
           "host_pool_bytes": homes.host_pool.nbytes,
           "host_slots_per_layer": homes.host_slots_per_layer, "pinned": homes.host_pool.pinned}
    late = stats.all_late_pages(skipped)
    out.update({"late_pages": late, "late_pages_per_token": late / steps,
                "late_fraction": late / selected if selected else None,
                "skipped_pages": skipped, "skipped_pages_per_token": skipped / steps,
                "redone_steps": stats.redone_steps, "redone_steps_per_token": stats.redone_steps / steps,
                "nvme_wait_ms_per_token": 1e3 * stats.nvme_wait_s / steps,
                "nvme_wait_bound_ms": 1e3 * wait_bound[0] if homes.spills else None,
                "nvme_max_redos": wait_bound[1] if homes.spills else None})
    if homes.spills:
        homes.quiesce()
        ps = homes.promoter.stats
        out.update({
            "nvme_direct_io": homes.nvme.direct_io, "nvme_pages": homes.directory.nvme_pages,
            "nvme_bytes_written": homes.nvme.bytes_written, "nvme_bytes_read": homes.nvme.bytes_read,
            "prefill_nvme_pages_written": stats.prefill_nvme_pages_written,
            "prefill_nvme_read_bytes": stats.prefill_nvme_read_bytes,
            "decode_nvme_read_bytes_per_token": ps.nvme_read_bytes / steps,
            "decode_nvme_write_bytes_per_token": ps.nvme_write_bytes / steps,
            "promoted_pages": ps.promoted_pages, "evicted_pages": ps.evicted_pages,
            # selected pages not read by the kept run of their step
            "unreadable_selected_pages": skipped,
            "unreadable_fraction": skipped / selected if selected else None,
            "promoter_steps_seen": ps.steps_seen, "promoter_steps_dropped": ps.steps_dropped,
            "promoter_busy_s": ps.busy_s, "nvme_io_threads": homes.nvme.io_threads})
    return out


def step_counters(stats: TierStats, homes: HostHomes, *, pages_gpu: int, length: int) -> dict:
    """Cumulative counters for lcrun profile (synchronises: call between steps). pages_gpu: pages
    in the GPU page cache now; length: tokens cached."""
    selected, hits = int(stats.selected), int(stats.hits)
    unreadable = int(stats.unreadable)  # skipped: not read by the kept run of their step
    late = stats.all_late_pages(unreadable)
    # selected_pages .. host_reads: the kept run of each token; nvme_reads: selected pages found
    # only on NVMe by a token's first run (late: read from disk for a run again, or skipped);
    # h2d_bytes also counts the host reads of runs done again.
    out = {"selected_pages": selected, "gpu_hits": hits, "host_reads": selected - hits - unreadable,
           "prefetched_pages": int(stats.prefetched), "prefetch_hits": int(stats.prefetch_hits),
           "nvme_reads": late,
           "h2d_bytes": (selected - hits - unreadable + stats.redo_host_reads()) * homes.page_bytes,
           "pages_gpu": pages_gpu, "late_pages": late, "skipped_pages": unreadable,
           "redone_steps": stats.redone_steps, "nvme_wait_ms": 1e3 * stats.nvme_wait_s}
    if homes.spills:
        out.update({"nvme_read_bytes": homes.promoter.stats.nvme_read_bytes, "pages_host": homes.host_pages(length),
                    "pages_nvme": homes.directory.nvme_pages})
    else:
        out["pages_host"] = homes.host_pages(length)
    return out
