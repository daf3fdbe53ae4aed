"""From torch profiler events to a per-decode-step time split over the runtime's named ranges.

Every profiled step runs inside a ``decode_step`` range; inside it the runtime marks its parts with
``named_range`` (see ``lcrun.profiling.ranges``). Each unit of work goes to the innermost named
range around the code that issued it:

* on a GPU, each kernel or memcpy goes by its *device* duration to the range around the CPU op
  that launched it (kineto links them by correlation id), so the split is GPU time, streams
  included; the step's wall time minus the union of its kernels' intervals is GPU idle time
  (launch gaps, and stalls on events or the host);
* on a CPU, each op's self time goes to its range, so the split is CPU time and adds up to the step.

Work outside any named range but inside the step (embedding, per-step planning, Python) is "other".
"""
from __future__ import annotations

from collections import defaultdict

STEP_RANGE = "decode_step"
OTHER = "other"
IDLE = "idle"

# Display order and labels; ranges not listed here keep their own name (fetch.X gets a label).
LABELS = {
    "score": "page scoring",
    "topk": "top-k selection",
    "fetch.gpu": "page fetch (GPU cache)",
    "fetch.host": "page fetch (host)",
    "fetch.nvme": "page fetch (NVMe)",
    "admit": "page admission",
    "prefetch": "prefetch (side stream)",
    "wait": "GPU wait",
    "attend": "attention kernel",
    "kv_write": "KV write + abstracts",
    "attention": "attention, other",
    "dense": "dense layers",
    "lm_head": "LM head",
    "sampling": "sampling",
    OTHER: "other (embedding, step setup, Python)",
    IDLE: "GPU idle (launch gaps, waits)",
}


def label(category: str) -> str:
    if category in LABELS:
        return LABELS[category]
    if category.startswith("fetch."):
        return f"page fetch ({category[len('fetch.'):]})"
    return category


def order(categories) -> list[str]:
    known = [c for c in LABELS if c in categories]
    return known + sorted(c for c in categories if c not in LABELS)


def _is_device(e) -> bool:
    return str(e.device_type).split(".")[-1] != "CPU"


def _is_range(e, names: set[str]) -> bool:
    return bool(getattr(e, "is_user_annotation", False)) or e.name in names


class _Tree:
    """Step index and category of every CPU event, through its ``cpu_parent`` chain (memoised)."""

    def __init__(self, cpu_events, range_names: set[str]):
        self.names = range_names
        steps = sorted((e for e in cpu_events if e.name == STEP_RANGE), key=lambda e: e.time_range.start)
        self.step_of_event = {id(e): i for i, e in enumerate(steps)}
        self.n_steps = len(steps)
        self._memo: dict[int, tuple[int | None, str | None]] = {}

    def place(self, e) -> tuple[int | None, str]:
        """(step index or None when outside every step, innermost range name or OTHER)."""
        chain = []
        node, found = e, None
        while node is not None:
            if id(node) in self._memo:
                found = self._memo[id(node)]
                break
            chain.append(node)
            node = node.cpu_parent
        step, cat = found if found is not None else (None, None)
        # Walk back down from the outermost unresolved ancestor, filling the memo.
        for node in reversed(chain):
            if node.name == STEP_RANGE and id(node) in self.step_of_event:
                step, cat = self.step_of_event[id(node)], None
            elif _is_range(node, self.names):
                cat = node.name
            self._memo[id(node)] = (step, cat)
        return step, cat or OTHER


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e3


def split_steps(events, wall_ms: list[float], range_names: set[str] = frozenset()) -> dict:
    """Per step {category: ms} from ``prof.events()``; ``wall_ms``: the steps' measured wall times.

    Returns {"basis": "gpu" | "cpu", "steps": [{"step", "wall_ms", "components_ms", ...}]}."""
    cpu = [e for e in events if not _is_device(e) and not getattr(e, "is_async", False)]
    tree = _Tree(cpu, set(range_names))
    device = [e for e in events if _is_device(e) and not getattr(e, "is_user_annotation", False)]
    comps: list[dict[str, float]] = [defaultdict(float) for _ in range(tree.n_steps)]
    busy: list[list[tuple[float, float]]] = [[] for _ in range(tree.n_steps)]
    if device:
        basis = "gpu"
        # Torch ops (not runtime calls) carry the ids that device events link back to.
        ops = {e.id: e for e in cpu if getattr(e, "linked_correlation_id", 0) == 0}
        for k in device:
            op = ops.get(getattr(k, "linked_correlation_id", 0))
            if op is None:
                continue
            step, cat = tree.place(op)
            if step is None:
                continue
            comps[step][cat] += (k.time_range.end - k.time_range.start) / 1e3
            busy[step].append((k.time_range.start, k.time_range.end))
    else:
        basis = "cpu"
        for e in cpu:
            step, cat = tree.place(e)
            if step is not None:
                comps[step][cat] += e.self_cpu_time_total / 1e3
    steps = []
    for i in range(tree.n_steps):
        row = {"step": i, "wall_ms": wall_ms[i] if i < len(wall_ms) else None,
               "components_ms": dict(comps[i])}
        if basis == "gpu":
            row["busy_ms"] = _union_ms(busy[i])
            if row["wall_ms"] is not None:
                row["components_ms"][IDLE] = max(0.0, row["wall_ms"] - row["busy_ms"])
        steps.append(row)
    return {"basis": basis, "steps": steps}


def mean_components(steps: list[dict]) -> dict[str, float]:
    """Mean ms per category over steps, in display order."""
    totals: dict[str, float] = defaultdict(float)
    for s in steps:
        for cat, ms in s["components_ms"].items():
            totals[cat] += ms
    n = max(1, len(steps))
    return {cat: totals[cat] / n for cat in order(totals)}
