"""The tiered KV store: a GPU page cache over pinned host memory (and NVMe), behind the attention
seam. ``TieredTopKCache`` (cache) is the facade; it owns one part per job:

    config      TierConfig: sizes and settings every part shares; which kernels move pages
    codec       PageCodec: page storage dtype, fp8 scales (fp8_scales), pages <-> stored bytes
    homes       HostHomes: host pool, page directory, NVMe store, promoter and spill writer
    settle      DecodeSettler: the NVMe tier between decode steps (late pages, steps run again)
    page_cache  GpuPageCache: direct-mapped slots, tags, admission, overflow slots, lent memory
    selection   PageSelector: page (relative, chunk) abstracts and the top-k page selection
    prefetch    Prefetcher: side stream, speculative admission, the auto probe and decision
    prefill     LayerwisePrefill: layer-by-layer prefill through a staging area
    placement   SpillPlacement: where a prefill's pages live in spill mode (host pool or NVMe)
    stats       TierStats, report(), step_counters()
"""
from lcrun.runtime.tiered.cache import TieredTopKCache
from lcrun.runtime.tiered.codec import fp8_scales
from lcrun.runtime.tiered.stats import TierStats

__all__ = ["TieredTopKCache", "TierStats", "fp8_scales"]
