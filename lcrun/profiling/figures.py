"""The profile report's plots, drawn with matplotlib's object API (no pyplot state, no GUI backend)
and returned as base64 PNG, so the HTML embeds them and opens offline."""
from __future__ import annotations

import base64
import io

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from lcrun.profiling.attribution import IDLE, label, order

_SIZE = (9.0, 3.6)


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _colors(categories: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps
    cmap = colormaps["tab20"]
    return {c: cmap(i % 20) for i, c in enumerate(categories)}


def step_split(decode: dict, floor_ms: float | None) -> str | None:
    """Stacked bars: each profiled step's time per named range. On a GPU: the GPU's time (streams
    counted once), GPU idle left out (it is most of an eager profiled step: launch-bound), with the
    timed step and the floor as lines; on a CPU: CPU time, with each step's wall time as a marker."""
    steps = decode["steps"]
    if not steps:
        return None
    gpu = decode["basis"] == "gpu"
    cats = [c for c in order({c for s in steps for c in s["components_ms"]}) if not (gpu and c == IDLE)]
    colors = _colors(cats)
    fig = Figure(figsize=(_SIZE[0], 4.2))
    ax = fig.add_subplot()
    xs = [s["step"] for s in steps]
    bottom = [0.0] * len(steps)
    for c in cats:
        vals = [s["components_ms"].get(c, 0.0) for s in steps]
        ax.bar(xs, vals, bottom=bottom, color=colors[c], label=label(c), width=0.7)
        bottom = [b + v for b, v in zip(bottom, vals)]
    walls = [s["wall_ms"] for s in steps]
    if gpu:
        idle = sum(s["components_ms"].get(IDLE, 0.0) for s in steps) / len(steps)
        title = f"GPU time per profiled step (idle {idle:.1f} ms of {sum(walls) / len(walls):.1f} ms not drawn)"
        if decode.get("timed_ms_median"):
            ax.axhline(decode["timed_ms_median"], color="black", linestyle=":", linewidth=1,
                       label=f"timed step {decode['timed_ms_median']:.2f} ms (as generation runs)")
    else:
        title = "CPU time per profiled step, by named range"
        if all(w is not None for w in walls):
            ax.plot(xs, walls, "k_", markersize=22, markeredgewidth=2, label="step wall time")
    if floor_ms:
        ax.axhline(floor_ms, color="crimson", linestyle="--", linewidth=1, label="weight-streaming floor")
    ax.set_xticks(xs)
    ax.set(xlabel="profiled decode step", ylabel="ms", title=title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)


def step_times(decode: dict, floor_ms: float | None) -> str:
    """ms per decode step through the run's phases, with the floor."""
    fig = Figure(figsize=_SIZE)
    ax = fig.add_subplot()
    x = 0
    for name, ms in (("warm-up (eager)", decode["warmup_ms"]), ("profiled (eager, profiler on)", decode["profiled_ms"]),
                     ("timed (as generation runs)", decode["timed_ms"])):
        ax.plot(range(x, x + len(ms)), ms, marker=".", label=name)
        x += len(ms)
    if floor_ms:
        ax.axhline(floor_ms, color="crimson", linestyle="--", linewidth=1, label=f"weight-streaming floor {floor_ms:.2f} ms")
    ax.set_yscale("log")
    ax.set(xlabel="decode step", ylabel="ms / token", title="Decode time per step")
    ax.legend(fontsize=8)
    return _png(fig)


def link_bandwidth(links: list[dict]) -> str:
    """Achieved vs peak per link (log scale: HBM and PCIe differ by ~100x), each bar with its value
    and the peak with where it came from."""
    fig = Figure(figsize=(_SIZE[0], 2.8))
    ax = fig.add_subplot()
    names = [r["link"] for r in links]
    ys = range(len(names))
    peaks = [(r["peak_bytes_per_s"] or 0) / 1e9 for r in links]
    got = [(r["achieved_bytes_per_s"] or 0) / 1e9 for r in links]
    ax.barh([y + 0.2 for y in ys], peaks, height=0.38, color="#c8d6e5", label="peak")
    ax.barh([y - 0.2 for y in ys], got, height=0.38, color="#2e86de", label="achieved (bytes per step / step time)")
    for y, r, peak, rate in zip(ys, links, peaks, got):
        if r["achieved_bytes_per_s"] is None:
            ax.text(0.02, y - 0.2, r.get("absent") or "not reported by this cache", va="center", fontsize=8,
                    transform=ax.get_yaxis_transform())
        else:
            ax.text(rate, y - 0.2, f" {rate:,.1f}", va="center", fontsize=7)
        if peak:
            ax.text(peak, y + 0.2, f" {peak:,.1f} ({r.get('peak_source')})", va="center", fontsize=7)
    ax.set_yticks(list(ys), names)
    if any(v > 0 for v in peaks + got):
        ax.set_xscale("log")
        ax.set_xlim(right=max(peaks + got) * 30)  # room for the labels
    ax.set(xlabel="GB/s", title="Bandwidth per link")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)


def _phases(ax, series: list[dict]) -> None:
    """Light bands and names for the run's phases (warm-up, profiled, timed) along the step axis."""
    start = 0
    for i in range(1, len(series) + 1):
        phase = series[start].get("phase")
        if i < len(series) and series[i].get("phase") == phase:
            continue
        if phase:
            if "profiled" in phase:
                ax.axvspan(start - 0.5, i - 0.5, color="#ececec", zorder=0)
            ax.text((start + i - 1) / 2, 0.02, phase.split(" (")[0], transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=7, color="#555")
        start = i


def hit_rates(series: list[dict]) -> str | None:
    have_hits = any(r.get("hit_rate") is not None for r in series)
    have_pf = any(r.get("prefetch_accuracy") is not None for r in series)
    if not (have_hits or have_pf):
        return None
    fig = Figure(figsize=_SIZE)
    ax = fig.add_subplot()
    xs = range(len(series))
    if have_hits:
        ax.plot(xs, [r.get("hit_rate") for r in series], marker=".", label="GPU page-cache hit rate")
    if have_pf:
        ax.plot(xs, [r.get("prefetch_accuracy") for r in series], marker=".", label="prefetch accuracy")
    ax.set_ylim(0, 1.05)
    _phases(ax, series)
    ax.set(xlabel="decode step", ylabel="fraction", title="Page cache over time (shaded: profiled steps)")
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def tier_pages(series: list[dict], on_gpu: bool = True) -> str | None:
    """Pages held in each tier after each step: lines, not a stack (a page's home is the host pool or
    NVMe, and the GPU holds cached copies of some of them, so the tiers overlap)."""
    tiers = [t for t in ("pages_gpu", "pages_host", "pages_nvme") if any(r.get(t) is not None for r in series)]
    if not tiers:
        return None
    fig = Figure(figsize=_SIZE)
    ax = fig.add_subplot()
    xs = list(range(len(series)))
    for t in tiers:
        name = ("GPU (cached copies)" if on_gpu else "device (CPU memory)") if t == "pages_gpu" else t[len("pages_"):]
        ax.plot(xs, [r.get(t) for r in series], marker=".", markersize=3, label=name)
    ax.set_ylim(bottom=0)
    _phases(ax, series)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
    ax.set(xlabel="decode step", ylabel="KV pages", title="Pages per tier (shaded: profiled steps)")
    ax.legend(fontsize=8, loc="center right")
    return _png(fig)


def prefill_throughput(prefill: dict) -> str | None:
    pts = [p for p in prefill["points"] if p.get("chunk_tok_s")]
    if not pts:
        return None
    fig = Figure(figsize=_SIZE)
    ax = fig.add_subplot()
    if prefill.get("mode") == "layer-major":  # one point per layer, each over the whole prompt
        xs, what = list(range(len(pts))), "per layer (whole prompt)"
        xlabel, title = "layer", "Prefill throughput per layer (layer-major: each layer runs over the whole prompt)"
    else:
        xs, what = [p["tokens"] for p in pts], "per chunk"
        xlabel, title = "tokens prefilled", "Prefill throughput over the prompt"
    ax.plot(xs, [p["chunk_tok_s"] for p in pts], marker=".", label=what)
    ax.axhline(prefill["tok_s"], color="gray", linestyle=":", label=f"whole prompt {prefill['tok_s']:,.0f} tok/s")
    ax.set_ylim(bottom=0)
    ax.set(xlabel=xlabel, ylabel="tokens / s", title=title)
    ax.legend(fontsize=8)
    return _png(fig)
