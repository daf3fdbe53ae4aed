"""From a torch profiler Chrome trace to a per-decode-step time split over the runtime's named ranges.

Every profiled step runs inside a ``decode_step`` range; inside it the runtime marks its parts with
``named_range`` (see ``lcrun.ranges``). The split is computed from the exported Chrome
trace (the same file the report links), so it can be re-run offline on any trace:

* a range is a ``user_annotation`` span on a CPU thread; at each instant the innermost open range
  is the one that counts (the step range itself counts as "other");
* a GPU kernel, memcpy or memset is linked to the CUDA runtime/driver call that launched it
  (``cudaLaunchKernel``, ``cuLaunchKernelEx``, ...) by its ``correlation`` id, falling back to the
  ``ac2g`` flow arrows; the launch call lies on a CPU thread, inside the ranges open there, so the
  kernel belongs to the step and the innermost range around its *launch*, whatever stream it ran on;
  a container range ("prefetch") keeps what is nested in it: the prefetcher's side-stream scoring,
  top-k and admission all count as "prefetch";
* the step's GPU time is then split without counting any instant twice: where kernels of several
  streams overlap, the main (busiest) stream's kernel takes the time and the side stream's is hidden
  (``overlap_ms``); so the parts plus the GPU's empty time add up to the step's wall time. The empty
  time is "wait" where the next kernel had already been launched (queued behind an event, a stream
  dependency or the GPU's own launch latency) and "idle" where the GPU waited for the CPU to launch
  it (Python, launch overhead, the profiler itself);
* with no GPU events (a CPU run), each instant of the step's thread goes to its innermost range:
  CPU time, adding up to the step.

Work outside any named range but inside the step (embedding, per-step planning, Python) is "other".

Why not ``prof.events()``: its device events link to ops through ``linked_correlation_id`` whose
meaning changed across torch versions, and kernels launched outside any aten op (Triton's
``cuLaunchKernelEx``) carry no op id at all; a trace also cannot be re-attributed after the fact.
"""
from __future__ import annotations

import bisect
from collections import defaultdict

from lcrun.profiling.trace import DEVICE_CATS, FLOW_CAT, LAUNCH_CATS, RANGE_CATS, category, trace_events

STEP_RANGE = "decode_step"
OTHER = "other"
IDLE = "idle"
WAIT = "wait"

# Display order and labels; ranges not listed here keep their own name (fetch.X gets a label).
LABELS = {
    "score": "page scoring",
    "topk": "top-k selection",
    "fetch.gpu": "page fetch (GPU cache)",
    "fetch.host": "page fetch (host)",
    "fetch.nvme": "page fetch (NVMe)",
    "admit": "page admission",
    "prefetch": "prefetch (side stream, exposed part)",
    WAIT: "GPU wait (next kernel queued, not yet running)",
    "attend": "attention kernel",
    "kv_write": "KV write + abstracts",
    "attention": "attention, other",
    "dense": "dense layers",
    "lm_head": "LM head",
    "sampling": "sampling",
    OTHER: "other (embedding, step setup, Python)",
    IDLE: "GPU idle (waiting for the CPU to launch)",
}

# Ranges that keep the work of the ranges nested in them: the prefetcher scores and selects (inside
# "score"/"topk" ranges of its own) on the side stream, and all of that is prefetch work.
CONTAINER_RANGES = frozenset({"prefetch"})


def label(part: str) -> str:
    if part in LABELS:
        return LABELS[part]
    if part.startswith("fetch."):
        return f"page fetch ({part[len('fetch.'):]})"
    return part


def order(parts) -> list[str]:
    known = [c for c in LABELS if c in parts]
    return known + sorted(c for c in parts if c not in LABELS)


def span(e: dict) -> tuple[float, float]:
    """(start, end) in microseconds (Chrome traces: ts and dur in us, fractional)."""
    start = float(e["ts"])
    return start, start + float(e.get("dur", 0.0))


class _Innermost:
    """The innermost open range at each instant of one CPU thread, as disjoint (start, end, name)."""

    def __init__(self, ranges: list[tuple[float, float, str]]):
        segs: list[tuple[float, float, str]] = []
        stack: list[tuple[float, str]] = []  # (end, name), outermost first
        t = 0.0

        def close_until(limit: float) -> None:
            nonlocal t
            while stack and stack[-1][0] <= limit:
                end, name = stack.pop()
                if end > t:
                    segs.append((t, end, name))
                t = max(t, end)

        for start, end, name in sorted(ranges, key=lambda r: (r[0], -r[1])):
            close_until(start)
            if stack:
                if start > t:
                    segs.append((t, start, stack[-1][1]))
                end = min(end, stack[-1][0])  # a child never outlives its parent (rounding in the trace)
                if stack[-1][1] in CONTAINER_RANGES:
                    name = stack[-1][1]
            stack.append((end, name))
            t = start
        close_until(float("inf"))
        self.segs = segs
        self.starts = [s[0] for s in segs]

    def at(self, ts: float) -> str | None:
        i = bisect.bisect_right(self.starts, ts) - 1
        if i >= 0 and ts < self.segs[i][1]:
            return self.segs[i][2]
        return None

    def split(self, a: float, b: float) -> dict[str, float]:
        """Microseconds of [a, b] per innermost range (time in no range is left out)."""
        out: dict[str, float] = defaultdict(float)
        i = max(0, bisect.bisect_right(self.starts, a) - 1)
        while i < len(self.segs) and self.segs[i][0] < b:
            s, e, name = self.segs[i]
            if e > a:
                out[name] += min(e, b) - max(s, a)
            i += 1
        return out


def _part(name: str | None) -> str:
    return OTHER if name is None or name == STEP_RANGE else name


class _Kernel:
    __slots__ = ("start", "end", "dur", "stream", "part", "queued")

    def __init__(self, start: float, dur: float, stream, part: str, queued: float):
        self.start, self.end, self.dur, self.stream, self.part, self.queued = start, start + dur, dur, stream, part, queued


def _gpu_split(kernels: list[_Kernel], main_stream, start: float) -> dict:
    """Exclusive GPU time per part (main stream first where streams overlap), and the empty time
    from ``start`` on that ended with a kernel already launched ("wait": the rest is idle)."""
    kernels = sorted(kernels, key=lambda k: (k.start, k.end))
    points = sorted([(k.start, 1, i) for i, k in enumerate(kernels)] + [(k.end, 0, i) for i, k in enumerate(kernels)])
    parts: dict[str, float] = defaultdict(float)
    active_main: set[int] = set()
    active_side: set[int] = set()
    busy, prev = 0.0, None
    for t, is_start, i in points:
        if prev is not None and t > prev and (active_main or active_side):
            winner = min(active_main) if active_main else min(active_side)  # the earliest-started
            parts[kernels[winner].part] += t - prev
            busy += t - prev
        active = active_main if kernels[i].stream == main_stream else active_side
        (active.add if is_start else active.discard)(i)
        prev = t
    # Empty time before each kernel that starts the GPU up again: wait once it was launched.
    wait, covered_to = 0.0, start
    for k in kernels:
        if k.start > covered_to:
            wait += k.start - max(covered_to, min(k.start, k.queued))
        covered_to = max(covered_to, k.end)
    kernel_us: dict[str, float] = defaultdict(float)
    for k in kernels:
        kernel_us[k.part] += k.dur  # the trace's own durations: ts near 1e12 us leaves ~1 ns per difference
    total = sum(kernel_us.values())
    return {"parts": parts, "busy": busy, "wait": wait, "kernel": kernel_us, "overlap": total - busy}


def _ms(us: dict[str, float]) -> dict[str, float]:
    return {k: v / 1e3 for k, v in us.items()}


def split_steps(trace, wall_ms: list[float] | None = None) -> dict:
    """Per step {part: ms} from a torch profiler Chrome trace (path, dict or event list);
    ``wall_ms``: the steps' measured wall times (default: the step ranges' durations).

    Returns {"basis": "gpu" | "cpu", "steps": [{"step", "wall_ms", "components_ms", "cpu_ms", ...}],
    "main_stream", "kernel_ms_by_stream", "unlinked_kernels"}."""
    ranges: dict[tuple, list[tuple[float, float, str]]] = defaultdict(list)
    steps: list[tuple[float, float, tuple]] = []
    launches: dict = {}         # correlation -> (thread, launch start, launch end)
    flow_starts: dict = {}      # flow id -> (thread, ts)
    flow_ends: dict = {}        # (pid, tid, ts) of a flow's end -> flow id
    device: list[dict] = []
    for e in trace_events(trace):
        ph, cat = e.get("ph"), category(e)
        thread = (e.get("pid"), e.get("tid"))
        if ph == "X":
            if cat in DEVICE_CATS:
                device.append(e)
            elif cat in LAUNCH_CATS and "correlation" in e.get("args", {}):
                launches[e["args"]["correlation"]] = (thread, *span(e))
            elif cat in RANGE_CATS:
                a, b = span(e)
                ranges[thread].append((a, b, e.get("name", "")))
                if e.get("name") == STEP_RANGE:
                    steps.append((a, b, thread))
        elif cat == FLOW_CAT and ph == "s":
            flow_starts[e.get("id")] = (thread, float(e["ts"]))
        elif cat == FLOW_CAT and ph == "f":
            flow_ends[(e.get("pid"), e.get("tid"), float(e["ts"]))] = e.get("id")
    steps.sort()
    steps = [s for i, s in enumerate(steps) if i == 0 or s[0] >= steps[i - 1][1]]  # a step nested in a step: one
    step_starts = [s[0] for s in steps]
    innermost = {thread: _Innermost(rs) for thread, rs in ranges.items()}

    def step_at(ts: float) -> int | None:
        i = bisect.bisect_right(step_starts, ts) - 1
        return i if i >= 0 and ts <= steps[i][1] else None

    per_step: list[list[_Kernel]] = [[] for _ in steps]
    unlinked = 0
    for k in device:
        a = float(k["ts"])
        args = k.get("args", {})
        corr = args.get("correlation", flow_ends.get((k.get("pid"), k.get("tid"), a)))
        launch = launches.get(corr)
        if launch is None and corr in flow_starts:
            thread, ts = flow_starts[corr]
            launch = (thread, ts, ts)
        if launch is None:  # no launch in the trace: by its GPU time, to no range
            unlinked += 1
            i, part, queued = step_at(a), OTHER, a
        else:
            thread, ts, queued = launch
            rs = innermost.get(thread)
            i, part = step_at(ts), _part(rs.at(ts) if rs else None)
        if i is not None:
            per_step[i].append(_Kernel(a, float(k.get("dur", 0.0)), args.get("stream", k.get("tid")), part, queued))

    by_stream: dict = defaultdict(float)
    for ks in per_step:
        for k in ks:
            by_stream[k.stream] += k.dur
    main_stream = max(by_stream, key=by_stream.get) if by_stream else None
    basis = "gpu" if device else "cpu"
    rows = []
    for i, (a, b, thread) in enumerate(steps):
        wall = wall_ms[i] if wall_ms is not None and i < len(wall_ms) else (b - a) / 1e3
        cpu: dict[str, float] = defaultdict(float)
        for name, us in innermost[thread].split(a, b).items():
            cpu[_part(name)] += us / 1e3
        row = {"step": i, "wall_ms": wall, "cpu_ms": dict(cpu)}
        if basis == "gpu":
            g = _gpu_split(per_step[i], main_stream, a)
            comps = _ms(g["parts"])
            comps[WAIT] = g["wait"] / 1e3
            comps[IDLE] = max(0.0, wall - (g["busy"] + g["wait"]) / 1e3)
            row.update(components_ms=comps, busy_ms=g["busy"] / 1e3, kernel_ms=_ms(g["kernel"]),
                       overlap_ms=g["overlap"] / 1e3, kernels=len(per_step[i]))
        else:
            row["components_ms"] = dict(cpu)
        rows.append(row)
    return {"basis": basis, "steps": rows, "main_stream": main_stream,
            "kernel_ms_by_stream": {str(s): us / 1e3 for s, us in by_stream.items()}, "unlinked_kernels": unlinked}


def mean_components(steps: list[dict], key: str = "components_ms") -> dict[str, float]:
    """Mean ms per part over steps, in display order (``key``: "components_ms" or "cpu_ms")."""
    totals: dict[str, float] = defaultdict(float)
    for s in steps:
        for part, ms in s.get(key, {}).items():
            totals[part] += ms
    n = max(1, len(steps))
    return {part: totals[part] / n for part in order(totals)}


def decode_summary(split: dict) -> dict:
    """The report's view of ``split_steps``: per step, the means in display order, and labels."""
    parts = mean_components(split["steps"])
    cpu_ms = mean_components(split["steps"], "cpu_ms")
    return {"basis": split["basis"], "steps": split["steps"], "mean_components_ms": parts, "mean_cpu_ms": cpu_ms,
            "labels": {c: label(c) for c in {*parts, *cpu_ms}}, "main_stream": split["main_stream"],
            "kernel_ms_by_stream": split["kernel_ms_by_stream"], "unlinked_kernels": split["unlinked_kernels"]}


def format_table(split: dict) -> str:
    """The split as a text table: one row per step, one column per part (ms)."""
    steps = split["steps"]
    cats = order({c for s in steps for c in s["components_ms"]})
    extra = ["busy_ms", "overlap_ms"] if split["basis"] == "gpu" else []
    head = ["step", *cats, "sum", "wall_ms", *extra]
    rows = [[str(s["step"]), *(f"{s['components_ms'].get(c, 0.0):.3f}" for c in cats),
             f"{sum(s['components_ms'].values()):.3f}", f"{s['wall_ms']:.3f}", *(f"{s[k]:.3f}" for k in extra)]
            for s in steps]
    mean = mean_components(steps)
    rows.append(["mean", *(f"{mean[c]:.3f}" for c in cats), f"{sum(mean.values()):.3f}",
                 f"{sum(s['wall_ms'] for s in steps) / max(1, len(steps)):.3f}", *("" for _ in extra)])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in [head, *rows])


if __name__ == "__main__":  # python -m lcrun.profiling.attribution TRACE.json.gz [WALL_MS,...]
    import sys
    walls = [float(v) for v in sys.argv[2].split(",")] if len(sys.argv) > 2 else None
    result = split_steps(sys.argv[1], walls)
    print(f"basis {result['basis']}, main stream {result['main_stream']}, "
          f"unlinked kernels {result['unlinked_kernels']}")
    print(format_table(result))
