"""Write a profiled run as report.json and one self-contained report.html (figures embedded)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jinja2

from lcrun.errors import LcrunError
from lcrun.profiling.attribution import label
from lcrun.profiling.template import REPORT_HTML
from lcrun.units import format_bytes

# Ranges a top-k / tiered cache is expected to mark; those a run did not show are listed as such.
EXPECTED_RANGES = ("score", "topk", "fetch.host", "fetch.nvme", "wait", "attend")


def check_dependencies() -> None:
    """Fail before a long run, not after it: the figures need matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LcrunError("lcrun profile draws its figures with matplotlib, which is not installed: "
                         "pip install matplotlib") from None


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null (json.dumps would write invalid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(data: dict, path: Path) -> Path:
    path.write_text(json.dumps(_clean(data), indent=1, default=str))
    return path


def _ms(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.2f} ms"


def _rate(v: float | None) -> str:
    return "-" if not v else f"{v / 1e9:.1f} GB/s"


def render_html(data: dict) -> str:
    check_dependencies()
    from lcrun.profiling import figures
    decode, series = data["decode"], data["counters"]["steps"]
    floor = data["links"]["weight_floor_ms"]
    figs = {"step_split": figures.step_split(decode, floor), "step_times": figures.step_times(decode, floor),
            "links": figures.link_bandwidth(data["links"]["links"]), "hit_rates": figures.hit_rates(series),
            "tier_pages": figures.tier_pages(series, data["model"]["device"].startswith("cuda")), "prefill": figures.prefill_throughput(data["prefill"])}
    seen = set(decode["mean_components_ms"])
    env = jinja2.Environment(autoescape=True)
    return env.from_string(REPORT_HTML).render(
        d=data, figs=figs, total_ms=sum(decode["mean_components_ms"].values()),
        missing_ranges=[r for r in EXPECTED_RANGES if r not in seen],
        has_prefetch=any(r.get("prefetch_accuracy") is not None for r in series),
        label=label, ms=_ms, rate=_rate, bytes=format_bytes)


def write_report(data: dict, out_dir: Path) -> tuple[Path, Path]:
    """(report.html, report.json) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = _clean(data)
    json_path = write_json(data, out_dir / "report.json")
    html_path = out_dir / "report.html"
    html_path.write_text(render_html(data), encoding="utf-8")
    return html_path, json_path
