"""Achieved bandwidth per link against its peak, and the weight-streaming floor.

A decode step must read every weight once from device memory (HBM, or DRAM on a CPU): the floor
on ms/token is weight bytes / device-memory bandwidth, whatever the attention does. On top come
the KV pages it attends (from HBM when cached, over PCIe from pinned host memory when not), the
page abstracts it scores, and pages read from NVMe. Bytes per step come from the cache's
counters where it reports them, else from the cache's shape (an estimate, marked as such).
Achieved bandwidth = bytes per step / measured step time: the rate the link would need to
sustain over the whole step, so it is a lower bound on its actual rate while busy.

Peaks, and where each comes from (``peak_source``), best first:
* "measured now": ``measure_peaks`` at the start of the profile -- on CUDA a 1 GiB device-to-device
  copy (bytes read + written, as ``lcrun calibrate`` counts them) and a 256 MiB pinned host->device
  copy, timed with CUDA events; on a CPU a 128 MiB memcpy in DRAM;
* "calibration cache": the planner's per-machine cache that ``lcrun calibrate`` fills
  (``lcrun.planner.hardware.Calibration``; the only source for NVMe, measured on the --kv-dir drive);
* "default": the planner's conservative defaults; "not applicable": a link the run does not have.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

MEASURED, CACHE, DEFAULT, NOT_APPLICABLE = "measured now", "calibration cache", "default", "not applicable"
HBM_COPY_BYTES = 1 << 30
H2D_COPY_BYTES = 256 << 20
CPU_COPY_BYTES = 128 << 20
MIN_COPY_BYTES = 64 << 20


def hardware_for(llm) -> Any:
    """The planner's Hardware for this run: the plan's, or detected (calibration if stored)."""
    if getattr(llm, "plan", None) is not None:
        return llm.plan.hardware
    import torch

    from lcrun.planner import detect_hardware
    cfg = llm.config
    if llm.device.type == "cuda":
        props = torch.cuda.get_device_properties(llm.device)
        return detect_hardware(props.name, props.total_memory, gpu_mem=cfg.gpu_mem, host_mem=cfg.host_mem,
                               kv_dir=cfg.kv_dir)
    return detect_hardware(None, None, host_mem=cfg.host_mem, kv_dir=cfg.kv_dir)


def _kv_estimate(cache, length: int) -> tuple[float, float]:
    """(attended KV bytes, abstract bytes) one decode step reads, from the cache's shape."""
    cfg = cache.cfg
    elem = cache.dtype.itemsize
    per_token = cfg.num_layers * cfg.num_kv_heads * 2 * cfg.head_dim * elem
    if not hasattr(cache, "page_size"):  # dense: every token, every layer
        return length * per_token, 0.0
    attended = min(length, getattr(cache, "budget", length))
    abstracts = (length // cache.page_size) * cfg.num_layers * cfg.num_kv_heads * 2 * cfg.head_dim * elem
    return attended * per_token, abstracts


def _median_rate(nbytes: int, run: Callable[[], float], repeats: int) -> float:
    run()  # warm-up: first touch, allocator, clocks
    return nbytes / statistics.median(run() for _ in range(repeats))


def _cuda_timer(device, fn: Callable[[], None]) -> Callable[[], float]:
    import torch

    def run() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    return run


def _wall_timer(fn: Callable[[], None]) -> Callable[[], float]:
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


def _copy_rate(device, nbytes: int, src_device, pinned: bool, counted: int, repeats: int) -> dict:
    """Rate of ``dst.copy_(src)`` for ``nbytes`` (halved down to MIN_COPY_BYTES while memory is
    short); ``counted`` bytes moved per byte copied (2 for read + write in one memory)."""
    import torch
    if device.type == "cuda":  # transient (freed before the prefill), but never more than a quarter of what is free
        nbytes = max(MIN_COPY_BYTES, min(nbytes, torch.cuda.mem_get_info(device)[0] // 4))
    while True:
        try:
            src = torch.ones(nbytes, dtype=torch.uint8, device=src_device, pin_memory=pinned)
            dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
            break
        except RuntimeError:  # out of (GPU or pinnable) memory: a smaller copy still gives the rate
            if nbytes // 2 < MIN_COPY_BYTES:
                raise
            nbytes //= 2

    def copy() -> None:
        dst.copy_(src, non_blocking=pinned)
    try:
        timer = _cuda_timer(device, copy) if device.type == "cuda" else _wall_timer(copy)
        return {"bytes_per_s": _median_rate(counted * nbytes, timer, repeats), "copy_bytes": nbytes}
    finally:
        src = dst = None  # noqa: F841 (the closure's tensors: free them before giving memory back)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def measure_peaks(device, repeats: int = 5) -> dict[str, dict]:
    """Link peaks measured now: {"HBM": ..., "host->GPU": ...} on CUDA, {"DRAM": ...} on a CPU; each
    {"bytes_per_s", "copy_bytes", "how"} or {"error"} when it could not be measured."""
    import torch
    if device.type == "cuda":
        jobs = {"HBM": (HBM_COPY_BYTES, device, False, 2, "device-to-device copy, bytes read + written, CUDA events"),
                "host->GPU": (H2D_COPY_BYTES, "cpu", True, 1, "pinned host -> device copy, CUDA events")}
    else:
        jobs = {"DRAM": (CPU_COPY_BYTES, "cpu", False, 2, "memcpy in host memory, bytes read + written")}
    out: dict[str, dict] = {}
    for link, (nbytes, src, pinned, counted, how) in jobs.items():
        try:
            out[link] = {**_copy_rate(device, nbytes, src, pinned, counted, repeats), "how": how}
        except RuntimeError as exc:
            out[link] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


def _peak(measured: dict | None, hw, field: str) -> tuple[float, str, str]:
    """(bytes/s, source, how) of one link: measured now, else the planner's calibration or default."""
    if measured and measured.get("bytes_per_s"):
        size = measured.get("copy_bytes")
        how = measured.get("how", "") + (f", {size / 2**20:,.0f} MiB" if size else "")
        return measured["bytes_per_s"], MEASURED, how
    failed = f"measuring failed ({measured['error']}); " if measured and measured.get("error") else ""
    if hw.source(field) == "measured":
        return getattr(hw, field), CACHE, failed + "lcrun calibrate, cached for this machine"
    return getattr(hw, field), DEFAULT, failed + "the planner's conservative default (no measurement, no calibration)"


def link_rows(llm, step_s: float, counters: list[dict], peaks: dict[str, dict] | None = None) -> dict:
    """Per link: bytes per step, achieved rate at ``step_s`` per step, peak and its source;
    ``peaks``: ``measure_peaks``'s result (None: calibration cache or defaults only)."""
    hw = hardware_for(llm)
    from lcrun.runtime.layer_kind_cache import context_cache, fixed_kv_bytes
    # the context-long KV (Gemma: global layers) by its shape and counters; local rings read whole
    cache, weights = context_cache(llm.cache), llm.model.weight_bytes() + fixed_kv_bytes(llm.cache)
    on_gpu = llm.device.type == "cuda"
    peaks = peaks or {}

    def mean(key: str) -> float | None:
        vals = [c[key] for c in counters if c.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    kv, abstracts = _kv_estimate(cache, cache.length)
    sel, hits = mean("selected_pages"), mean("gpu_hits")
    page_bytes = (2 * cache.page_size * cache.cfg.head_dim * cache.dtype.itemsize
                  if hasattr(cache, "page_size") else None)
    hbm_basis = "estimate from the cache's shape"
    if sel is not None and hits is not None and page_bytes:
        kv, hbm_basis = hits * page_bytes, "counters (cached pages) + shape (abstracts)"
    h2d, nvme = mean("h2d_bytes"), mean("nvme_read_bytes")
    mem = "HBM" if on_gpu else "DRAM"
    rows = [{"link": mem, "bytes_per_step": weights + kv + abstracts, "basis": hbm_basis,
             **dict(zip(("peak_bytes_per_s", "peak_source", "peak_how"),
                        _peak(peaks.get(mem), hw, "gpu_mem_bytes_per_s")))},
            {"link": "host->GPU", "bytes_per_step": h2d, "basis": "counters" if h2d is not None else None},
            {"link": "NVMe", "bytes_per_step": nvme, "basis": "counters" if nvme is not None else None}]
    # Links a run does not use are said to be absent, not "not reported"; they have no peak.
    if on_gpu:
        rows[1].update(zip(("peak_bytes_per_s", "peak_source", "peak_how"),
                           _peak(peaks.get("host->GPU"), hw, "h2d_bytes_per_s")))
    else:
        rows[1]["absent"] = "no GPU: no host->GPU link"
    if hw.kv_dir:
        rows[2].update(zip(("peak_bytes_per_s", "peak_source", "peak_how"),
                           _peak(None, hw, "disk_read_bytes_per_s")))
    else:
        rows[2]["absent"] = "no --kv-dir: no NVMe tier"
    for r in rows:
        if "absent" in r:
            r.update(peak_bytes_per_s=None, peak_source=NOT_APPLICABLE, peak_how=r["absent"])
        b, peak = r["bytes_per_step"], r["peak_bytes_per_s"]
        r["achieved_bytes_per_s"] = b / step_s if b is not None and step_s > 0 else None
        r["fraction_of_peak"] = r["achieved_bytes_per_s"] / peak if r["achieved_bytes_per_s"] and peak else None
    floor = rows[0]
    return {"links": rows, "weight_bytes": weights, "weight_floor_ms": 1e3 * weights / floor["peak_bytes_per_s"],
            "floor_link": floor["link"], "floor_bandwidth_bytes_per_s": floor["peak_bytes_per_s"],
            "floor_source": floor["peak_source"], "peaks_measured": peaks, "hardware": hw.to_dict()}
