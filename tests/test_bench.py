"""`lcrun bench`: the sweep's JSON, its baselines and ratios, and contexts that fail without ending it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lcrun.errors import ConfigError
from lcrun.profiling.bench import Sweep, format_rows, late_median, ratios, step_stats, warm_median


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # As a user on a CPU runs it: torch page kernels, not the test session's Triton interpreter.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "lcrun.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[1])


TOPK = ["--attention", "topk", "--page-size", "16", "--sink-tokens", "16", "--window-tokens", "64", "--budget", "128"]


@pytest.mark.slow
def test_bench_sweep_with_baselines_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    res = cli("bench", "--model", "synthetic:tiny", "--device", "cpu", *TOPK, "--contexts", "256,512", "--steps", "4",
              "--dense-contexts", "256", "--transformers", "dense,offloaded,static", "--transformers-contexts", "256",
              "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["kind"] == "lcrun.bench"
    assert data["meta"]["commit"] and "gpu" in data["meta"]
    assert data["settings"]["attention"] == "topk" and data["settings"]["budget"] == 128
    rows = {(r["impl"], r.get("attention"), r["context"]): r for r in data["rows"]}
    assert set(rows) == {("lcrun", "topk", 256), ("lcrun", "topk", 512), ("lcrun", "dense", 256),
                         ("transformers-dense", None, 256), ("transformers-offloaded", None, 256),
                         ("transformers-static", None, 256)}
    for key in [("lcrun", "topk", 256), ("lcrun", "topk", 512), ("lcrun", "dense", 256),
                ("transformers-dense", None, 256)]:
        r = rows[key]
        assert "error" not in r, r
        assert r["prefill_tok_s"] > 0 and r["decode_ms"] > 0
        assert len(r["decode_ms_steps"]) == 4
        assert r["decode_ms_p10"] <= r["decode_ms"] <= r["decode_ms_p90"]
        assert "peak_gpu_bytes" in r
    for key in [("lcrun", "topk", 256), ("lcrun", "topk", 512)]:
        assert rows[key]["attention_requested"] == "topk" and rows[key]["attention_reason"] == "--attention topk"
    assert rows[("lcrun", "dense", 256)]["attention_requested"] == "dense"
    assert "256 tokens: attention: top-k (--attention topk)" in res.stderr
    # The offloaded cache needs a GPU: recorded as that context's error, the sweep went on.
    assert "needs a GPU" in rows[("transformers-offloaded", None, 256)]["error"]
    assert "needs a GPU" in rows[("transformers-static", None, 256)]["error"]  # its CUDA graphs
    baselines = {(r["context"], r["baseline"]) for r in data["ratios"]}
    assert baselines == {(256, "lcrun-dense"), (256, "transformers-dense")}
    assert "transformers-dense" in res.stdout and "needs a GPU" in res.stdout


def test_bench_records_what_auto_attention_resolved_to(tmp_path):
    out = tmp_path / "bench.json"
    res = cli("bench", "--model", "synthetic:tiny", "--device", "cpu", "--contexts", "256", "--steps", "2",
              "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["settings"]["attention"] == "auto"
    (row,) = data["rows"]
    assert row["attention_requested"] == "auto" and row["attention"] == "dense"  # CPU, fits, inside the window
    assert "fits in host memory" in row["attention_reason"]
    assert f"256 tokens: attention: dense ({row['attention_reason']})" in res.stderr


def test_bench_rejects_unknown_transformers_cache(tmp_path):
    res = cli("bench", "--model", "synthetic:tiny", "--device", "cpu", "--transformers", "paged",
              "--out", str(tmp_path / "x.json"))
    assert res.returncode == 1
    assert "--transformers takes dense, offloaded, static" in res.stderr
    assert "Traceback" not in res.stderr


def test_warm_median_never_counts_the_cold_step():
    assert warm_median([100, 90, 80, 1, 2, 3, 4]) == 2.5  # enough steps: all the warm-up ones go
    assert warm_median([100, 1, 2]) == 1.5                # too few: still the first
    assert warm_median([100, 1]) == 1


def test_late_median_is_the_second_half_of_the_warm_steps():
    assert late_median([100, 90, 80, 9, 8, 3, 4]) == 3.5
    assert late_median([100, 1, 2]) == 2


def test_step_stats_spread_of_the_warm_steps():
    ms = [500.0, 90, 80] + [float(v) for v in range(1, 12)]  # warm steps: 1..11
    st = step_stats(ms)
    assert st["decode_ms"] == 6 and st["decode_ms_p10"] == 2 and st["decode_ms_p90"] == 10
    assert st["decode_ms_steps"] == ms
    two = step_stats([500.0, 3.0])
    assert two["decode_ms"] == two["decode_ms_p10"] == two["decode_ms_p90"] == 3


def test_uncapped_dense_rows_are_labelled():
    swept = {"impl": "lcrun", "attention": "topk", "context": 1, "decode_ms": 5.0, "decode_ms_p10": 4.0,
             "decode_ms_p90": 6.0, "prefill_tok_s": 100, "gpu_cap_bytes": 1 << 30}
    dense = dict(swept, attention="dense", decode_ms=9.0, gpu_cap_bytes=None)
    (r,) = ratios([swept, dense], "topk")
    assert r["baseline"] == "lcrun-dense-uncapped" and r["decode_speedup"] == 1.8
    table = format_rows([swept, dense]).splitlines()
    assert table[2].startswith("lcrun dense uncapped") and "4.00-6.00" in table[1]


def test_ratios_pair_baselines_with_the_swept_config():
    rows = [{"impl": "lcrun", "attention": "topk", "context": 1, "decode_ms": 10, "prefill_tok_s": 100},
            {"impl": "lcrun", "attention": "dense", "context": 1, "decode_ms": 40, "prefill_tok_s": 50},
            {"impl": "transformers-offloaded", "context": 1, "decode_ms": 1000, "prefill_tok_s": 25},
            {"impl": "transformers-dense", "context": 2, "decode_ms": 5, "prefill_tok_s": 1},
            {"impl": "transformers-dense", "context": 1, "error": "out of GPU memory"}]
    got = {r["baseline"]: r for r in ratios(rows, "topk")}
    assert set(got) == {"lcrun-dense", "transformers-offloaded"}
    # --attention auto: the swept rows are the ones asked for auto, whatever they resolved to
    auto_rows = [dict(rows[0], attention_requested="auto"), dict(rows[1], attention_requested="dense"), *rows[2:]]
    assert {r["baseline"] for r in ratios(auto_rows, "auto")} == {"lcrun-dense", "transformers-offloaded"}
    assert got["transformers-offloaded"]["decode_speedup"] == 100
    assert got["lcrun-dense"]["prefill_speedup"] == 2


def test_sweep_validates_steps():
    with pytest.raises(ConfigError, match="cold step"):
        Sweep(contexts=[1], steps=1)


def test_transformers_static_cache_decode_on_the_cpu():
    """The static-cache loop (explicit cache positions) without torch.compile: it decodes the same
    tokens as the dynamic cache (the compiled CUDA-graph step runs on the GPU only)."""
    transformers = pytest.importorskip("transformers")
    from lcrun.profiling import bench
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    tokens = {}
    argmax = torch.Tensor.argmax

    def record(kind):
        def spy(t, *a, **kw):
            out = argmax(t, *a, **kw)
            tokens.setdefault(kind, []).append(out.flatten().tolist())
            return out
        return spy
    for kind in ("dense", "static"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.Tensor, "argmax", record(kind))
            row = bench.transformers_decode(ref, 64, 40, 4, kind, 16, 0, torch.device("cpu"), compiled=False)
        assert row["prefill_tok_s"] > 0 and row["decode_ms_p10"] <= row["decode_ms"] <= row["decode_ms_p90"]
        assert len(row["decode_ms_steps"]) == 4 and "compile_s" not in row
    assert tokens["static"] == tokens["dense"] and len(tokens["dense"]) == 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_fair_baselines_on_the_gpu(tmp_path):
    """transformers' static cache under torch.compile (CUDA graphs) and lcrun dense without the
    cap, beside the capped top-k rows."""
    out = tmp_path / "bench.json"
    res = cli("bench", "--model", "synthetic:tiny", "--gpu-mem", "4GiB", "--contexts", "1k", "--steps", "8",
              "--dense-contexts", "1k", "--no-dense-cap", "--transformers", "dense,static", "--out", str(out),
              timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {(r["impl"], r.get("attention")): r for r in json.loads(out.read_text())["rows"]}
    for r in rows.values():
        assert "error" not in r, r
        assert r["decode_ms_p10"] <= r["decode_ms"] <= r["decode_ms_p90"]
    assert rows[("lcrun", "dense")]["gpu_cap_bytes"] is None and rows[("lcrun", "dense")]["cuda_graph"]
    assert rows[("transformers-static", None)]["compile_s"] > 0
    assert "lcrun dense uncapped" in res.stdout and "transformers-static" in res.stdout


def test_sweep_closes_each_llm_before_the_next(monkeypatch):
    from lcrun.api import LLM
    from lcrun.config import LcrunConfig
    from lcrun.profiling.bench import Sweep, run_sweep
    events = []
    real_init, real_close = LLM.__init__, LLM.close

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        events.append(("open", self.config.ctx_tokens))

    def close(self):
        if not self.closed:
            events.append(("close", self.config.ctx_tokens))
        real_close(self)

    monkeypatch.setattr(LLM, "__init__", init)
    monkeypatch.setattr(LLM, "close", close)
    config = LcrunConfig(model="synthetic:tiny", device="cpu", attention="dense")
    doc = run_sweep(config, Sweep(contexts=[64, 128], steps=2, dense_contexts=[96]))
    assert all("error" not in r for r in doc["rows"]) and len(doc["rows"]) == 3
    assert events == [("open", 74), ("close", 74), ("open", 138), ("close", 138), ("open", 106), ("close", 106)]
    assert doc["model_name"] == "synthetic:tiny (llama, 427K params, random weights)"
