"""Shared bits of the perf scripts: run metadata and result files."""
from __future__ import annotations

import datetime
import json
import platform
import statistics
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_metadata() -> dict:
    import torch
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "python": platform.python_version(), "torch": torch.__version__,
            "host": platform.node()}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        meta["gpu"] = props.name
        meta["gpu_memory_bytes"] = props.total_memory
    else:
        meta["gpu"] = None
    return meta


def gpu_slug(meta: dict) -> str:
    return (meta.get("gpu") or "cpu").replace("NVIDIA ", "").replace(" ", "-").lower()


def write_result(name: str, payload: dict, out: str | None = None) -> Path:
    meta = payload.setdefault("meta", run_metadata())
    path = Path(out) if out else RESULTS / f"{name}-{gpu_slug(meta)}-{meta['date'][:10]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
