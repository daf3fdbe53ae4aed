"""KV page tiers below the GPU: a pinned host pool and NVMe page files under --kv-dir."""
from lcrun.offload.host_pool import HostPagePool, pinned_bytes_in_use
from lcrun.offload.nvme_store import NvmeStore

__all__ = ["HostPagePool", "NvmeStore", "pinned_bytes_in_use"]
