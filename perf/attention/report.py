"""The run's environment record and the console tables of `python -m perf.attention`."""
from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import torch
import triton


def environment(commit_override: str | None = None) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = commit_override or "unknown"
    try:  # files changed since that commit (a benchmark of uncommitted work says so)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True,
                               text=True, check=True, cwd=Path(__file__).resolve().parent).stdout.split("\n")
        dirty = sorted(line[3:] for line in dirty if line.strip())
    except Exception:  # noqa: BLE001
        dirty = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu-interpreter"
    return {"gpu": gpu, "git_commit": commit or "unknown", "git_modified_files": dirty, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def _us(sparse: dict, part: str) -> float:
    """A part's time in us: graph replay where there was one, else eager."""
    return sparse[part].get("graph_ms", sparse[part]["ms"]) * 1e3


def _header(text: str) -> None:
    print(text)
    print("-" * len(text))


def print_table(results: list[dict], copy_bw: dict) -> None:
    """Kernel times from CUDA-graph replay where there is one (what the captured runtime sees)."""
    print(f"\ndevice-to-device copy: {copy_bw['GBps']:.0f} GB/s (read + write); times in us, "
          f"graph replay where available (eager in brackets); old = torch.topk selection")
    head = (f"{'context':>8} | {'plan':>5} | {'score':>6} {'GB/s':>5} | {'select':>6} {'(old)':>6} | "
            f"{'attend':>6} {'GB/s':>5} | {'sparse':>6} {'(eager)':>8} {'old':>6} {'-plan':>6} | "
            f"{'dense':>7} {'GB/s':>5} | {'speedup':>7} {'old':>5} {'-plan':>5}")
    _header(head)
    for r in results:
        s = r["sparse"]
        bw = lambda part: s[part].get("graph_GBps", s[part]["GBps"])  # noqa: E731
        dense = r["dense"].get(r["dense_best"], {}) if r["dense_best"] else {}
        dense_us = dense.get("graph_ms", dense.get("ms", float("nan"))) * 1e3
        print(f"{r['context']:>8} | {_us(s, 'plan (per step)'):5.1f} | {_us(s, 'score'):6.1f} {bw('score'):5.0f} | "
              f"{_us(s, 'select'):6.1f} {_us(s, 'select (torch.topk, old)'):6.1f} | {_us(s, 'attend'):6.1f} {bw('attend'):5.0f} | "
              f"{_us(s, 'sparse total'):6.1f} ({s['sparse total']['ms'] * 1e3:6.1f}) "
              f"{_us(s, 'sparse total (torch.topk, old)'):6.1f} {_us(s, 'layer without plan'):6.1f} | "
              f"{dense_us:7.1f} {r.get('dense_best_GBps', 0):5.0f} | "
              f"{r.get('speedup_graph', r.get('speedup_eager', 0)):7.1f} "
              f"{r.get('speedup_graph_old', r.get('speedup_eager_old', 0)):5.1f} "
              f"{r.get('speedup_graph_without_plan', 0):5.1f}")
    best = {r["context"]: r["dense_best"] for r in results}
    print(f"dense baseline = fastest SDPA variant per context: {best}")
    print("\nfolded plan (no plan launch) and hierarchical selection; us graph replay; speedup vs dense;"
          " quality: recall of flat's top pages / attention mass (random keys | structured keys, hot-page recall)")
    head = (f"{'context':>8} | {'flat':>6} {'x':>5} | {'chunk':>5} {'GB/s':>5} {'hsel':>5} {'hier':>6} {'x':>5} | "
            f"variant: us x recall(rand) mass(rand) | recall(str) hot mass(str)")
    _header(head)
    for r in results:
        s = r["sparse"]
        q = r["selection_quality"]
        print(f"{r['context']:>8} | {_us(s, 'flat total (folded plan)'):6.1f} {r.get('speedup_graph_flat_folded', 0):5.1f} | "
              f"{_us(s, 'hier: chunk score'):5.1f} {s['hier: chunk score'].get('graph_GBps', 0):5.0f} "
              f"{_us(s, 'hier: select (chunk score + pages + top-k)'):5.1f} {_us(s, 'hier total (folded plan)'):6.1f} "
              f"{r.get('speedup_graph_hier', 0):5.1f} | flat mass {q['random']['flat']['attention_mass']:.3f} | "
              f"{q['structured']['flat']['attention_mass']:.3f} hot {q['structured']['flat'].get('hot_recall', 0):.2f}")
        for name, vr in q["random"].items():
            if name == "flat":
                continue
            key = name.split("/")[1]
            vs = q["structured"][name]
            print(f"{'':>8} | {'':>12} | {'':>31} | {key:>7}: {r.get('speedup_graph_hier_variants', {}).get(key, 0):5.1f}x "
                  f"{vr['recall_vs_flat']:.2f} {vr['attention_mass']:.3f} | {vs['recall_vs_flat']:.2f} "
                  f"{vs.get('hot_recall', 0):.2f} {vs['attention_mass']:.3f}")
