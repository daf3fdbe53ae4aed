"""Built-in profiles of GPUs people run models on, for plans of a card the user does not have
(``lcrun plan --gpu rtx4090``).

Memory size, peak memory bandwidth and PCIe link are the vendor's published specifications:
  RTX 4090   24 GB GDDR6X, 1008 GB/s, PCIe 4.0 x16   nvidia.com/en-us/geforce/graphics-cards/40-series/rtx-4090/
  RTX 4080   16 GB GDDR6X,  717 GB/s, PCIe 4.0 x16   nvidia.com/en-us/geforce/graphics-cards/40-series/rtx-4080-family/
  RTX 3090   24 GB GDDR6X,  936 GB/s, PCIe 4.0 x16   nvidia.com/en-us/geforce/graphics-cards/30-series/rtx-3090-3090ti/
  RTX 5090   32 GB GDDR7,  1792 GB/s, PCIe 5.0 x16   nvidia.com/en-us/geforce/graphics-cards/50-series/rtx-5090/
  RTX A6000  48 GB GDDR6,   768 GB/s, PCIe 4.0 x16   nvidia.com/en-us/design-visualization/rtx-a6000/ (datasheet)
The planner wants what a streaming read reaches, not the peak: READ_FRACTION of it (measured
copies reach 80-90% of the peak on GDDR6X cards and HBM alike; lcrun calibrate measures the real
one). Pinned host->GPU copies reach about 25 GB/s on PCIe 4.0 x16 and 50 GB/s on 5.0 x16
(perf: an H100's PCIe 5.0 link measured 54.9 GB/s, ../shared/device/MEASURED.md).
"""
from __future__ import annotations

from dataclasses import dataclass

from lcrun.errors import ConfigError

GB = 10 ** 9   # bandwidths are quoted in decimal GB/s
GiB = 1 << 30  # memory sizes: "24 GB" cards carry 24 GiB (12 x 2 GiB chips on an RTX 4090)
READ_FRACTION = 0.85
PCIE_BYTES_PER_S = {4: 25e9, 5: 50e9}  # pinned copies, x16


@dataclass(frozen=True)
class GpuProfile:
    key: str
    name: str
    memory_bytes: int
    peak_bytes_per_s: float
    pcie_gen: int

    @property
    def read_bytes_per_s(self) -> float:
        return self.peak_bytes_per_s * READ_FRACTION

    @property
    def h2d_bytes_per_s(self) -> float:
        return PCIE_BYTES_PER_S[self.pcie_gen]


GPU_PROFILES = {p.key: p for p in (
    GpuProfile("rtx4090", "NVIDIA GeForce RTX 4090 (profile)", 24 * GiB, 1008 * GB, 4),
    GpuProfile("rtx4080", "NVIDIA GeForce RTX 4080 (profile)", 16 * GiB, 716.8 * GB, 4),
    GpuProfile("rtx3090", "NVIDIA GeForce RTX 3090 (profile)", 24 * GiB, 936 * GB, 4),
    GpuProfile("rtx5090", "NVIDIA GeForce RTX 5090 (profile)", 32 * GiB, 1792 * GB, 5),
    GpuProfile("a6000", "NVIDIA RTX A6000 (profile)", 48 * GiB, 768 * GB, 4),
)}


def gpu_profile(key: str) -> GpuProfile:
    profile = GPU_PROFILES.get(key.lower())
    if profile is None:
        raise ConfigError(f"--gpu {key!r} is not a built-in profile: use one of {', '.join(GPU_PROFILES)}")
    return profile
