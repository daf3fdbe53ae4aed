"""Chrome/Perfetto traces of the torch profiler: categories, writing (compressed), reading, stream overlap."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

KINETO_NOISE = b"USDT:"  # kineto's "USDT: ... profiler_start" / "profiler_stop" lines


@contextmanager
def _kineto_noise_dropped() -> Iterator[None]:
    """Kineto (the profiler's C++ side) writes a USDT line to file descriptor 2 at every start and
    stop, below sys.stderr; its only off switch (KINETO_LOG_LEVEL=6, read once per process) would
    hide its errors too. So fd 2 goes to a file while the profiler starts or stops, and every other
    line is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().splitlines(keepends=True) if not line.startswith(KINETO_NOISE)]
            if kept:
                os.write(2, b"".join(kept))


@contextmanager
def profiling(activities: Sequence) -> Iterator:
    """``torch.profiler.profile(activities=...)`` over the block, yielding the profiler, without
    kineto's USDT lines on the terminal."""
    from torch.profiler import profile
    prof = profile(activities=activities)
    with _kineto_noise_dropped():
        prof.__enter__()
    try:
        yield prof
    finally:
        with _kineto_noise_dropped():
            prof.__exit__(None, None, None)


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


# Chrome trace categories of the torch profiler (lower-cased: older kineto wrote "Kernel", "Memcpy",
# "Runtime"): GPU work, the CPU calls that launch it, the arrows between them, record_function ranges.
DEVICE_CATS = frozenset({"kernel", "gpu_memcpy", "gpu_memset", "memcpy", "memset"})
LAUNCH_CATS = frozenset({"cuda_runtime", "cuda_driver", "runtime", "driver"})
FLOW_CAT = "ac2g"
RANGE_CATS = frozenset({"user_annotation"})


def category(e: dict) -> str:
    return str(e.get("cat", "")).lower()


def load_trace(path: str | os.PathLike) -> dict:
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def trace_events(trace) -> list[dict]:
    """The events of a trace given as a path (.json or .json.gz), a loaded dict, or an event list."""
    if isinstance(trace, (str, os.PathLike)):
        trace = load_trace(trace)
    if isinstance(trace, dict):
        return trace.get("traceEvents", [])
    return list(trace)


def overlap_from_trace(path: str | os.PathLike) -> dict:
    """GPU kernel time per stream, and how much of the side streams' kernel time ran while a kernel
    of the main (busiest) stream was running: how well admission and prefetch hide behind compute."""
    by_stream: dict[int, list[tuple[float, float]]] = {}
    for e in trace_events(path):
        if category(e) in DEVICE_CATS and "dur" in e:
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
