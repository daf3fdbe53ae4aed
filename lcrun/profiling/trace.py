"""Chrome/Perfetto traces of the torch profiler: writing them compressed, and reading stream overlap."""
from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path


def export_trace_gz(prof, path: str | os.PathLike) -> Path:
    """Write ``prof``'s Chrome trace to ``path`` (which should end in .json.gz): Perfetto and
    chrome://tracing open the compressed file, and a trace of a few thousand kernels is ~10x smaller."""
    path = Path(path)
    raw = path.with_suffix("") if path.suffix == ".gz" else path.with_name(path.name + ".raw")
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    return path


def load_trace(path: str | os.PathLike) -> dict:
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def overlap_from_trace(path: str | os.PathLike) -> dict:
    """GPU kernel time per stream, and how much of the side streams' kernel time ran while a kernel
    of the main (busiest) stream was running: how well admission and prefetch hide behind compute."""
    events = load_trace(path)["traceEvents"]
    by_stream: dict[int, list[tuple[float, float]]] = {}
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memcpy") and "dur" in e:
            by_stream.setdefault(e["args"].get("stream", -1), []).append((e["ts"], e["ts"] + e["dur"]))
    if not by_stream:
        return {}
    busy = {s: sum(b - a for a, b in iv) for s, iv in by_stream.items()}
    main = max(busy, key=busy.get)
    main_iv = sorted(by_stream[main])
    overlapped = 0.0
    for s, iv in by_stream.items():
        if s == main:
            continue
        for a, b in sorted(iv):
            for c, d in main_iv:  # fine for a few thousand kernels
                if c >= b:
                    break
                overlapped += max(0.0, min(b, d) - max(a, c))
    side_total = sum(v for s, v in busy.items() if s != main)
    return {"main_stream": main, "kernel_us_by_stream": busy, "side_us": side_total,
            "side_us_overlapping_main": overlapped,
            "side_overlap_fraction": overlapped / side_total if side_total else None}
