"""What the machine offers: memory caps, free disk, and link bandwidths.

The planner never touches the GPU: the caller (who has torch) passes the GPU's name and size in,
and the bandwidth measurements are made by torch code in ``lcrun.offload`` and stored here, in a
per-machine JSON cache, through :class:`Calibration` (``lcrun calibrate``; a GPU run stores the
GPU links itself the first time: ``lcrun.offload.calibrate.gpu_calibration``). Without a
calibration the planner uses conservative defaults and says so in the plan.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from lcrun.planner.gpus import GpuProfile

from lcrun.errors import ConfigError
from lcrun.units import format_bytes, parse_bytes

# Conservative link speeds used until calibration has run. They sit below what a consumer box
# reaches (PCIe Gen4 x16 pinned copies ~25 GB/s, RTX 4090 HBM ~1 TB/s, a Gen4 NVMe 3-7 GB/s),
# so an uncalibrated plan predicts decode a little slower than it will be, never faster.
DEFAULT_H2D_BYTES_PER_S = 20e9
DEFAULT_GPU_MEM_BYTES_PER_S = 900e9
DEFAULT_DISK_READ_BYTES_PER_S = 1.5e9
DEFAULT_DISK_WRITE_BYTES_PER_S = 1.0e9
# CPU-only runs: "device memory" is DRAM; two-channel DDR5 streams ~60 GB/s, take less.
DEFAULT_CPU_MEM_BYTES_PER_S = 40e9

# Pinned host memory for KV pages, when --host-mem is not given: what is available now less a
# reserve of a quarter of the machine's memory (at least HOST_RESERVE_MIN_BYTES), and never less
# than half of what is available. The reserve stays for the OS, page cache, the Python process and
# staging weights while loading; pinned pages cannot be swapped, so over-committing them stalls the
# whole machine. A page on a disk costs far more than one in RAM (a step that selects one waits
# for it), so a large machine lends most of its memory: 93 GiB of a 128 GiB box, 44 of 64.
HOST_CAP_FRACTION = 0.5
HOST_RESERVE_FRACTION = 0.25
HOST_RESERVE_MIN_BYTES = 8 * 2 ** 30
# CPU-only: host memory is the compute device and holds the weights too, so take more of it.
CPU_HOST_CAP_FRACTION = 0.8

BANDWIDTH_FIELDS = ("h2d_bytes_per_s", "gpu_mem_bytes_per_s", "disk_read_bytes_per_s", "disk_write_bytes_per_s")
DISK_FIELDS = ("disk_read_bytes_per_s", "disk_write_bytes_per_s")
CALIBRATION_FILE = "calibration.json"
CACHE_DIR_ENV = "LCRUN_CACHE_DIR"


def cache_dir() -> Path:
    """``$LCRUN_CACHE_DIR`` if set, else ``~/.cache/lcrun``."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lcrun"


def calibration_path() -> Path:
    return cache_dir() / CALIBRATION_FILE


def _mount_point(path: str | os.PathLike) -> str:
    """The mount point holding ``path`` (or its nearest existing parent): disk speed is per drive."""
    p = Path(path).expanduser().resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)


@dataclass
class Calibration:
    """Measured link speeds of one machine (GPU name + hostname), cached as JSON.

    Fields left None were not measured. Disk numbers belong to the drive of ``disk_dir``: they are
    only used for a --kv-dir on the same mount point. What the planner assumes each number means:
    h2d: pinned host -> GPU page gathers of page-sized pieces (not one big memcpy); gpu_mem: device
    memory read bandwidth (weights streaming); disk_read/disk_write: page-sized random reads /
    sequential writes of KV page files (decode misses are random, prefill spills are sequential).
    """

    gpu_name: str | None
    hostname: str = field(default_factory=socket.gethostname)
    h2d_bytes_per_s: float | None = None
    gpu_mem_bytes_per_s: float | None = None
    disk_read_bytes_per_s: float | None = None
    disk_write_bytes_per_s: float | None = None
    disk_dir: str | None = None
    measured_at: float | None = None  # unix time of the measurement

    @staticmethod
    def key(gpu_name: str | None, hostname: str | None = None) -> str:
        return f"{hostname or socket.gethostname()}|{gpu_name or 'cpu'}"

    @classmethod
    def load(cls, gpu_name: str | None, hostname: str | None = None,
             path: str | os.PathLike | None = None) -> "Calibration | None":
        """The stored calibration for this machine, or None (none stored, or the file is unreadable:
        a broken cache must never stop a run, it only means defaults)."""
        entries = _read_entries(Path(path) if path else calibration_path())
        entry = entries.get(cls.key(gpu_name, hostname))
        if not isinstance(entry, dict):
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in entry.items() if k in names})
        except TypeError:
            return None

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write this entry into the cache file (other machines' entries are kept); atomic replace."""
        path = Path(path) if path else calibration_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.measured_at is None:
            self.measured_at = time.time()
        entries = _read_entries(path)
        entries[self.key(self.gpu_name, self.hostname)] = dataclasses.asdict(self)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": 1, "entries": entries}, indent=2, sort_keys=True))
        os.replace(tmp, path)
        return path

    def disk_applies_to(self, kv_dir: str | os.PathLike | None) -> bool:
        if kv_dir is None or self.disk_dir is None:
            return False
        return _mount_point(self.disk_dir) == _mount_point(kv_dir)


def _read_entries(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    return dict(entries) if isinstance(entries, dict) else {}


@dataclass
class Hardware:
    """Caps and speeds of the machine the plan is for.

    gpu_* are None on a CPU-only machine; then host memory is the compute device. ``sources`` says,
    per bandwidth and cap, where the number came from: "measured", "default", "--gpu-mem",
    "detected", or "given" (set directly, e.g. in tests or what-if planning).
    """

    gpu_name: str | None
    gpu_total_bytes: int | None
    gpu_cap_bytes: int | None
    host_total_bytes: int
    host_available_bytes: int
    host_cap_bytes: int
    kv_dir: str | None = None
    kv_dir_free_bytes: int | None = None
    h2d_bytes_per_s: float = DEFAULT_H2D_BYTES_PER_S
    gpu_mem_bytes_per_s: float | None = None  # None: the default for the device (HBM, or DRAM on CPU)
    disk_read_bytes_per_s: float = DEFAULT_DISK_READ_BYTES_PER_S
    disk_write_bytes_per_s: float = DEFAULT_DISK_WRITE_BYTES_PER_S
    sources: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.gpu_mem_bytes_per_s is None:
            self.gpu_mem_bytes_per_s = (DEFAULT_GPU_MEM_BYTES_PER_S if self.gpu_cap_bytes is not None
                                        else DEFAULT_CPU_MEM_BYTES_PER_S)
            self.sources.setdefault("gpu_mem_bytes_per_s", "default")
        if (self.gpu_total_bytes is None) != (self.gpu_cap_bytes is None):
            raise ConfigError("hardware: gpu_total_bytes and gpu_cap_bytes must both be set or both be None")
        for name in BANDWIDTH_FIELDS:
            if not getattr(self, name) > 0:
                raise ConfigError(f"hardware: {name} must be positive, got {getattr(self, name)!r}")
        if self.gpu_cap_bytes is not None and self.gpu_cap_bytes <= 0:
            raise ConfigError(f"hardware: the GPU cap must be positive, got {self.gpu_cap_bytes}")
        if self.host_cap_bytes < 0:
            raise ConfigError(f"hardware: the host cap must not be negative, got {self.host_cap_bytes}")

    @property
    def on_gpu(self) -> bool:
        return self.gpu_cap_bytes is not None

    @property
    def device_cap_bytes(self) -> int:
        """Memory of the compute device the plan may fill: the GPU cap, or the host cap on CPU."""
        return self.gpu_cap_bytes if self.gpu_cap_bytes is not None else self.host_cap_bytes

    def source(self, name: str) -> str:
        return self.sources.get(name, "given")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sources"] = {name: self.source(name) for name in (*BANDWIDTH_FIELDS, "gpu_cap_bytes", "host_cap_bytes")}
        d["on_gpu"] = self.on_gpu
        return d


def profile_hardware(profile: "GpuProfile", gpu_mem: str | int | None = None, host_mem: str | int | None = None,
                     kv_dir: str | os.PathLike | None = None, **host: int) -> Hardware:
    """A machine with the GPU of a built-in profile (lcrun.planner.gpus): its memory and link
    speeds instead of this machine's GPU (disk and host memory are this machine's, or ``host``)."""
    hw = detect_hardware(profile.name, profile.memory_bytes, gpu_mem=gpu_mem, host_mem=host_mem, kv_dir=kv_dir,
                         calibration=None, **host)
    hw.gpu_mem_bytes_per_s, hw.h2d_bytes_per_s = profile.read_bytes_per_s, profile.h2d_bytes_per_s
    hw.sources.update(gpu_mem_bytes_per_s=f"{profile.key} profile", h2d_bytes_per_s=f"{profile.key} profile")
    return hw


def detect_hardware(gpu_name: str | None, gpu_total_bytes: int | None, gpu_mem: str | int | None = None,
                    host_mem: str | int | None = None, kv_dir: str | os.PathLike | None = None, *,
                    calibration: "Calibration | None | str" = "auto",
                    host_total_bytes: int | None = None, host_available_bytes: int | None = None) -> Hardware:
    """Describe this machine. GPU numbers come from the caller (None, None on a CPU-only machine).

    gpu_mem / host_mem: the --gpu-mem / --host-mem settings ('24GiB' or bytes).
    calibration: "auto" loads the cached one for this GPU + hostname; None uses the defaults.
    host_total_bytes / host_available_bytes: override psutil (what-if planning for another box).
    """
    if gpu_name is not None and gpu_total_bytes is None:
        raise ConfigError("detect_hardware: a GPU name was given without its memory size")
    on_gpu = gpu_total_bytes is not None
    notes: list[str] = []
    sources: dict[str, str] = {}

    vm = psutil.virtual_memory()
    host_total = int(host_total_bytes if host_total_bytes is not None else vm.total)
    host_avail = int(host_available_bytes if host_available_bytes is not None else vm.available)

    gpu_cap = None
    if on_gpu:
        if gpu_mem is not None:
            gpu_cap = parse_bytes(gpu_mem)
            if gpu_cap <= 0:
                raise ConfigError(f"--gpu-mem must be positive, got {gpu_mem!r}")
            if gpu_cap > gpu_total_bytes:
                raise ConfigError(f"--gpu-mem {format_bytes(gpu_cap)} is more than the GPU has "
                                  f"({format_bytes(gpu_total_bytes)}): lower --gpu-mem or leave it out")
            sources["gpu_cap_bytes"] = "--gpu-mem"
        else:
            gpu_cap = int(gpu_total_bytes)
            sources["gpu_cap_bytes"] = "detected"
    elif gpu_mem is not None:
        notes.append("--gpu-mem is ignored: no GPU")

    if host_mem is not None:
        host_cap = parse_bytes(host_mem)
        if host_cap < 0:
            raise ConfigError(f"--host-mem must not be negative, got {host_mem!r}")
        if host_cap > host_total:
            raise ConfigError(f"--host-mem {format_bytes(host_cap)} is more than this machine has "
                              f"({format_bytes(host_total)}): lower --host-mem")
        if host_cap > host_avail:
            notes.append(f"--host-mem {format_bytes(host_cap)} is more than is free now "
                         f"({format_bytes(host_avail)}): pinning it may push other programs into swap")
        sources["host_cap_bytes"] = "--host-mem"
    elif on_gpu:
        reserve = max(HOST_RESERVE_FRACTION * host_total, HOST_RESERVE_MIN_BYTES)
        host_cap = int(max(host_avail * HOST_CAP_FRACTION, host_avail - reserve))
        sources["host_cap_bytes"] = f"available less a reserve of {format_bytes(reserve)}"
    else:
        host_cap = int(host_avail * CPU_HOST_CAP_FRACTION)
        sources["host_cap_bytes"] = f"{CPU_HOST_CAP_FRACTION:.0%} of available"

    kv_dir_str, kv_free = None, None
    if kv_dir is not None:
        p = Path(kv_dir).expanduser()
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--kv-dir {p} is a file, not a folder")
        probe = p
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent  # the folder will be created; its drive is the nearest parent's
        kv_dir_str, kv_free = str(p), int(shutil.disk_usage(probe).free)

    if calibration == "auto":
        calibration = Calibration.load(gpu_name)
    defaults = {
        "h2d_bytes_per_s": DEFAULT_H2D_BYTES_PER_S,
        "gpu_mem_bytes_per_s": DEFAULT_GPU_MEM_BYTES_PER_S if on_gpu else DEFAULT_CPU_MEM_BYTES_PER_S,
        "disk_read_bytes_per_s": DEFAULT_DISK_READ_BYTES_PER_S,
        "disk_write_bytes_per_s": DEFAULT_DISK_WRITE_BYTES_PER_S,
    }
    speeds: dict[str, float] = {}
    for name, default in defaults.items():
        value = getattr(calibration, name, None) if isinstance(calibration, Calibration) else None
        if value is not None and name in DISK_FIELDS and not calibration.disk_applies_to(kv_dir_str):
            value = None  # measured on another drive (or no --kv-dir to compare with)
        if value is not None and value > 0:
            speeds[name], sources[name] = float(value), "measured"
        else:
            speeds[name], sources[name] = default, "default"

    return Hardware(gpu_name=gpu_name, gpu_total_bytes=None if not on_gpu else int(gpu_total_bytes),
                    gpu_cap_bytes=gpu_cap, host_total_bytes=host_total, host_available_bytes=host_avail,
                    host_cap_bytes=host_cap, kv_dir=kv_dir_str, kv_dir_free_bytes=kv_free,
                    sources=sources, notes=notes, **speeds)
