"""Per-step counters of an attention cache: page-cache hits, prefetch accuracy, bytes per link and
pages per tier, sampled after every decode step of a profiled run.

The interface a cache offers (all optional; what is missing shows as "not reported by this cache"):

``cache.step_counters() -> dict[str, int]``, read between steps (it may synchronise). Cumulative
counts since the cache was made, except the ``pages_*`` gauges:

    selected_pages    pages selected by decode steps (all layers and KV heads)
    gpu_hits          of those, found in the GPU page cache
    host_reads        of those, read from pinned host memory
    nvme_reads        of those, found only on NVMe (read from disk, or skipped that step)
    prefetched_pages  pages admitted ahead of need by the prefetcher
    prefetch_hits     of those, selected by the step they were fetched for (``prefetch_used`` is
                      read as an older name of it)
    h2d_bytes         bytes moved host -> GPU by decode steps
    nvme_read_bytes   bytes read from NVMe by decode steps
    pages_gpu, pages_host, pages_nvme   pages held in each tier now (gauges)

A cache with only ``report()`` (the tiered cache's hit statistics) gives hits and, from the misses,
host->GPU bytes; a paged cache that keeps everything on its device gives its page count.
"""
from __future__ import annotations

CUMULATIVE = ("selected_pages", "gpu_hits", "host_reads", "nvme_reads", "prefetched_pages", "prefetch_hits",
              "h2d_bytes", "nvme_read_bytes")
ALIASES = {"prefetch_used": "prefetch_hits"}
GAUGES = ("pages_gpu", "pages_host", "pages_nvme")


def _page_bytes(cache) -> int | None:
    if not hasattr(cache, "page_size"):
        return None
    return 2 * cache.page_size * cache.cfg.head_dim * cache.dtype.itemsize


def read_counters(cache) -> tuple[dict[str, int], str]:
    """(counters, source): source says where they came from, for the report."""
    if hasattr(cache, "step_counters"):
        raw = cache.step_counters()
        out = {ALIASES.get(k, k): int(v) for k, v in raw.items() if ALIASES.get(k, k) in CUMULATIVE + GAUGES}
        return out, "step_counters()"
    out: dict[str, int] = {}
    source = "none"
    r = cache.report()  # empty for a cache without tiers
    if "selected_pages" in r and "cache_hits" in r:
        out.update(selected_pages=int(r["selected_pages"]), gpu_hits=int(r["cache_hits"]))
        out.update({k: int(r[k]) for k in ("prefetched_pages", "prefetch_hits") if r.get(k) is not None})
        pb = _page_bytes(cache)
        # Misses are read zero-copy from pinned host memory by the attention kernel.
        if pb is not None:
            out["h2d_bytes"] = (out["selected_pages"] - out["gpu_hits"]) * pb
        source = "report() (hits; host bytes from misses)"
    elif hasattr(cache, "page_size") and hasattr(cache, "length"):
        cfg = cache.cfg
        out["pages_gpu"] = -(-cache.length // cache.page_size) * cfg.num_layers * cfg.num_kv_heads
        source = "the cache's shape (every page on the compute device)"
    return out, source


def per_step(samples: list[dict[str, int]]) -> list[dict[str, float | None]]:
    """Per-step series from consecutive cumulative samples (sample 0 is before the first step)."""
    out = []
    for prev, cur in zip(samples, samples[1:]):
        d = {k: cur[k] - prev[k] for k in CUMULATIVE if k in cur and k in prev}
        row: dict[str, float | None] = dict(d)
        sel = d.get("selected_pages")
        row["hit_rate"] = d["gpu_hits"] / sel if sel and "gpu_hits" in d else None
        pf = d.get("prefetched_pages")
        row["prefetch_accuracy"] = d["prefetch_hits"] / pf if pf and "prefetch_hits" in d else None
        for g in GAUGES:
            if g in cur:
                row[g] = cur[g]
        out.append(row)
    return out


def reported(series: list[dict], key: str) -> bool:
    return any(row.get(key) is not None for row in series)
