"""`python -m perf.attention` end to end at tiny shapes (the CPU interpreter): the script and its
helper modules still fit together, check correctness and write a complete results file."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_attention_smoke_writes_results(tmp_path):
    out = tmp_path / "bench_attention.json"
    run = subprocess.run([sys.executable, "-m", "perf.attention", "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "correctness: dense-equivalent" in run.stdout
    report = json.loads(out.read_text())
    assert [r["context"] for r in report["results"]] == [512, 1000]
    for r in report["results"]:
        assert r["fused_selection_same_sets"] and r["sparse_vs_reference_rel_err"] < 2e-2
        assert {"flat", "hier/4x2", "hier/4x4"} <= set(r["selection_quality"]["structured"])
    assert report["command"].startswith("python -m perf.attention --smoke") and report["copy_bandwidth"]["GBps"] > 0
