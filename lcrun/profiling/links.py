"""Achieved bandwidth per link against the calibrated peak, and the weight-streaming floor.

A decode step must read every weight once from device memory (HBM, or DRAM on a CPU): the floor
on ms/token is weight bytes / device-memory bandwidth, whatever the attention does. On top come
the KV pages it attends (from HBM when cached, over PCIe from pinned host memory when not), the
page abstracts it scores, and pages read from NVMe. Bytes per step come from the cache's
counters where it reports them, else from the cache's shape (an estimate, marked as such).
Achieved bandwidth = bytes per step / measured step time: the rate the link would need to
sustain over the whole step, so it is a lower bound on its actual rate while busy.
"""
from __future__ import annotations

from typing import Any


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


def link_rows(llm, step_s: float, counters: list[dict]) -> dict:
    """Per link: bytes per step, achieved rate at ``step_s`` per step, calibrated peak and source."""
    hw = hardware_for(llm)
    cache, weights = llm.cache, llm.model.weight_bytes()
    on_gpu = llm.device.type == "cuda"

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
    rows = [
        {"link": "HBM" if on_gpu else "DRAM", "bytes_per_step": weights + kv + abstracts, "basis": hbm_basis,
         "peak_bytes_per_s": hw.gpu_mem_bytes_per_s, "peak_source": hw.source("gpu_mem_bytes_per_s")},
        {"link": "host->GPU", "bytes_per_step": h2d, "basis": "counters" if h2d is not None else None,
         "peak_bytes_per_s": hw.h2d_bytes_per_s if on_gpu else None, "peak_source": hw.source("h2d_bytes_per_s")},
        {"link": "NVMe", "bytes_per_step": nvme, "basis": "counters" if nvme is not None else None,
         "peak_bytes_per_s": hw.disk_read_bytes_per_s if hw.kv_dir else None,
         "peak_source": hw.source("disk_read_bytes_per_s")},
    ]
    # Links a run does not use are said to be absent, not "not reported".
    if not on_gpu:
        rows[1]["absent"] = "no GPU: no host->GPU link"
    if not hw.kv_dir:
        rows[2]["absent"] = "no --kv-dir: no NVMe tier"
    for r in rows:
        b, peak = r["bytes_per_step"], r["peak_bytes_per_s"]
        r["achieved_bytes_per_s"] = b / step_s if b is not None and step_s > 0 else None
        r["fraction_of_peak"] = r["achieved_bytes_per_s"] / peak if r["achieved_bytes_per_s"] and peak else None
    floor_s = weights / hw.gpu_mem_bytes_per_s
    return {"links": rows, "weight_bytes": weights, "weight_floor_ms": 1e3 * floor_s,
            "floor_link": rows[0]["link"], "floor_bandwidth_bytes_per_s": hw.gpu_mem_bytes_per_s,
            "floor_source": hw.source("gpu_mem_bytes_per_s"), "hardware": hw.to_dict()}
