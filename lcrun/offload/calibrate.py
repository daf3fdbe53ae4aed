"""A short measurement of this machine's links, cached for the planner (``lcrun calibrate``).

h2d: pinned host -> GPU gathers of random pages by the zero-copy Triton kernel, the way the
tiered store moves pages (not one big memcpy); gpu_mem: a large device-to-device copy (bytes read
plus written); disk: sequential writes and random page reads of real files under --kv-dir through
the NVMe store (O_DIRECT where the filesystem allows). On a machine without a GPU only the disk
is measured. The GPU's rates are the best of a few repetitions (a link's rate is what it can do:
another process on the GPU only slows some repetitions down, and a calibration taken beside one
was once saved at 40% of the device's memory rate); the disk's, the median.
"""
from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path

import torch

from lcrun.errors import LcrunError
from lcrun.offload.host_pool import HostPagePool
from lcrun.offload.nvme_store import NvmeStore
from lcrun.planner import Calibration

PAGE_BYTES = 16 * 1024


def _rate(nbytes: int, run, repeats: int = 5, best: bool = False) -> float:
    """Bytes per second of ``run`` over ``repeats`` calls: of the fastest call, or of the median one."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return nbytes / (min(times) if best else statistics.median(times))


def measure_gpu(device: torch.device, pages: int = 8192) -> tuple[float, float]:
    """(h2d, gpu_mem) bytes/s."""
    from lcrun.kernels.tiered import gather_pages_to_staging
    P, d = 32, 128
    pool = HostPagePool(pages, 2 * P * d * 2)
    try:
        host_kv = pool.slots_view(torch.bfloat16, (2, P, d))
        host_kv.view(-1)[:: 997] = 1  # touch the pages
        slots = torch.randperm(pages, device=device).to(torch.int32).view(1, pages)
        staging = [torch.empty((1, pages * P, d), device=device, dtype=torch.bfloat16) for _ in range(2)]

        def gather():
            gather_pages_to_staging(host_kv, slots, pages, *staging)
            torch.cuda.synchronize(device)
        gather()
        h2d = _rate(pages * 2 * P * d * 2, gather, repeats=8, best=True)
    finally:
        pool.close()
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
        torch.cuda.synchronize(device)
    copy()
    hbm = _rate(2 * src.numel(), copy, repeats=8, best=True)
    return h2d, hbm


def measure_disk(kv_dir: str, slots: int = 16384) -> tuple[float, float]:
    """(read, write) bytes/s: random page reads, sequential page writes (256 MiB of 16 KiB pages)."""
    with NvmeStore(kv_dir, PAGE_BYTES, slots) as store:
        buf = torch.randint(0, 255, (slots, PAGE_BYTES), dtype=torch.uint8)
        t0 = time.perf_counter()
        store.write(range(slots), buf)
        write = slots * PAGE_BYTES / (time.perf_counter() - t0)
        order = torch.randperm(slots)[: slots // 4].tolist()
        dst = torch.empty((len(order), PAGE_BYTES), dtype=torch.uint8)
        read = _rate(len(order) * PAGE_BYTES, lambda: store.read_into_sync(order, dst), repeats=3)
    return read, write


def calibrate(device: torch.device, kv_dir: str | None = None, path: Path | None = None) -> Calibration:
    if kv_dir is not None:  # checked before measuring; a missing folder is not created (nor its parents)
        folder = Path(kv_dir).expanduser()
        if not folder.exists():
            raise LcrunError(f"--kv-dir {kv_dir} does not exist: create it on the disk to measure, then run "
                             "lcrun calibrate again")
        if not folder.is_dir():
            raise LcrunError(f"--kv-dir {kv_dir} is not a folder: give a folder on the disk to measure")
    gpu_name = torch.cuda.get_device_properties(device).name if device.type == "cuda" else None
    cal = Calibration(gpu_name=gpu_name)
    if device.type == "cuda":
        cal.h2d_bytes_per_s, cal.gpu_mem_bytes_per_s = measure_gpu(device)
    if kv_dir is not None:
        cal.disk_read_bytes_per_s, cal.disk_write_bytes_per_s = measure_disk(kv_dir)
        cal.disk_dir = str(Path(kv_dir).resolve())
    cal.save(path)
    return cal


AUTO_ENV = "LCRUN_AUTO_CALIBRATE"
log = logging.getLogger(__name__)  # the library reports; the application decides what to show


def gpu_calibration(device: torch.device, gpu_name: str) -> Calibration | None:
    """This machine's stored calibration; when it lacks the GPU links, they are measured first
    (about a second: 2 GiB of device memory and 128 MiB pinned, freed after) and stored, since
    the planner's defaults are a consumer card's and mispredict a faster GPU several times over.
    ``LCRUN_AUTO_CALIBRATE=0`` turns the measurement off. A failed measurement never stops a run:
    the plan then uses the defaults and says so."""
    cal = Calibration.load(gpu_name)
    if cal is not None and cal.h2d_bytes_per_s and cal.gpu_mem_bytes_per_s:
        return cal
    if os.environ.get(AUTO_ENV, "1") == "0":
        return cal
    try:
        h2d, hbm = measure_gpu(device)
    except Exception as exc:  # noqa: BLE001 - planning with defaults beats not running
        log.warning(f"could not measure the GPU's links ({type(exc).__name__}: {exc}); planning with "
                    "defaults (lcrun calibrate retries)")
        return cal
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the 2 GiB copy buffers go back before the model loads
    cal = cal or Calibration(gpu_name=gpu_name)
    cal.h2d_bytes_per_s, cal.gpu_mem_bytes_per_s, cal.measured_at = h2d, hbm, None
    path = cal.save()
    log.info(f"measured this GPU's links once: host->GPU {h2d / 1e9:.1f} GB/s, device memory "
             f"{hbm / 1e9:.0f} GB/s (saved to {path}; lcrun calibrate --kv-dir DIR adds the disk)")
    return cal
