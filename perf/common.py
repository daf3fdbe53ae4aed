"""Shared bits of the perf scripts: run metadata (from lcrun.profiling.meta) and result files."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from lcrun.profiling.meta import git_commit, gpu_slug, run_metadata

RESULTS = Path(__file__).resolve().parent / "results"
REPORTS = Path(__file__).resolve().parent / "reports"

__all__ = ["RESULTS", "REPORTS", "git_commit", "gpu_slug", "median", "run_metadata", "write_result"]


def write_result(name: str, payload: dict, out: str | None = None) -> Path:
    meta = payload.setdefault("meta", run_metadata())
    path = Path(out) if out else RESULTS / f"{name}-{gpu_slug(meta)}-{meta['date'][:10]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
