"""Write a profiled run as report.json and one self-contained report.html (figures embedded)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jinja2

from lcrun.errors import LcrunError
from lcrun.profiling.attribution import IDLE, decode_summary, label, split_steps
from lcrun.profiling.template import REPORT_HTML
from lcrun.units import format_bytes

# Ranges a top-k / tiered cache is expected to mark; those a run did not show are listed as such.
EXPECTED_RANGES = ("score", "topk", "fetch.host", "fetch.nvme", "wait", "attend")


def _missing_ranges(data: dict) -> list[tuple[str, str]]:
    """(range, why it is not in the split) for the expected ranges this run did not show."""
    decode = data["decode"]
    nvme = next((r for r in data["links"]["links"] if r["link"] == "NVMe"), {})
    out = []
    for r in EXPECTED_RANGES:
        if r in decode["mean_components_ms"]:
            continue
        if r == "fetch.nvme" and nvme.get("absent"):
            out.append((r, f"not in this run ({nvme['absent']})"))
        elif r == "wait" and decode["basis"] != "gpu":
            out.append((r, "not in this run (no GPU)"))
        else:
            out.append((r, "not reported by this cache"))
    return out


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
    comps = decode["mean_components_ms"]
    hidden_ms = sum(s.get("overlap_ms") or 0.0 for s in decode["steps"]) / max(1, len(decode["steps"]))
    env = jinja2.Environment(autoescape=True)
    return env.from_string(REPORT_HTML).render(
        d=data, figs=figs, total_ms=sum(comps.values()), gpu_work_ms=sum(v for c, v in comps.items() if c != IDLE),
        hidden_ms=hidden_ms, cpu_ms=decode.get("mean_cpu_ms") or {},
        missing_ranges=_missing_ranges(data),
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


def reattribute(report_dir: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Split the decode steps of an existing report again from its trace (e.g. one written before
    a fix of the attribution) and write the report to ``out_dir`` (default: in place)."""
    report_dir = Path(report_dir)
    data = json.loads((report_dir / "report.json").read_text())
    split = split_steps(report_dir / data["trace"], data["decode"]["profiled_ms"])
    data["decode"].update(decode_summary(split))
    prefill = data["prefill"]
    if "mode" not in prefill:  # reports before the mode was recorded: one point per layer is layer-major
        n, t = data["model"]["layers"], prefill["tokens"]
        per_layer = [p["tokens"] for p in prefill["points"]] == [t * (i + 1) // n for i in range(n)]
        prefill["mode"] = "layer-major" if per_layer else "chunked"
    out_dir = Path(out_dir) if out_dir else report_dir
    if out_dir != report_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / data["trace"]).write_bytes((report_dir / data["trace"]).read_bytes())
    return write_report(data, out_dir)


if __name__ == "__main__":  # python -m lcrun.profiling.report REPORT_DIR [OUT_DIR]: re-split from the trace
    import sys
    for p in reattribute(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None):
        print(p)
