"""GPU checks (run on the device: `pytest -m gpu`); skipped where there is no CUDA GPU."""
from __future__ import annotations

import gc

import pytest
import torch

from lcrun.runtime.demo import demo_model_path

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def demo():
    path = demo_model_path()
    if path is None:
        pytest.skip("demo model not installed")
    return str(path)


def _greedy(model: str, device: str, dtype: str, n: int, **settings) -> list[int]:
    from lcrun import LLM
    llm = LLM(model, ctx="4k", device=device, dtype=dtype, progress=False, **settings)
    msgs = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    return list(llm.stream_ids(llm.encode_chat(msgs), max_new_tokens=n))


def test_demo_greedy_tokens_same_on_gpu_and_cpu(demo):
    cpu = _greedy(demo, "cpu", "float32", 64)
    gpu = _greedy(demo, "cuda", "float32", 64)
    assert gpu == cpu


def test_gpu_mem_cap_is_enforced():
    from lcrun import LLM
    from lcrun.errors import CapacityError
    with pytest.raises(CapacityError, match="GPU cap"):  # the weights alone (2.5 GB in bf16) are over the cap
        LLM("synthetic:llama-3.2-1b", ctx="1M", gpu_mem="2GiB", progress=False)


@pytest.mark.parametrize("attention,ctx", [("dense", "8k"), ("topk", "8k"), ("topk", "256k")])
def test_graph_replayed_decode_matches_eager(attention, ctx, monkeypatch):
    """The captured decode step (DecodeStepper) gives the tokens of eager steps, for the dense
    cache and the on-GPU paged top-k cache (context past the budget, so selection is live; a
    256K cache selects hierarchically, through chunk abstracts)."""
    from lcrun import LLM

    def run(graph: str) -> list[int]:
        monkeypatch.setenv("LCRUN_CUDA_GRAPH", graph)
        llm = LLM("synthetic:llama-3.2-1b", ctx=ctx, attention=attention, budget=512, sink_tokens=32, window_tokens=128,
                  dtype="float32", positions="true", progress=False)
        if ctx == "256k":
            assert llm.cache.chunk_pages > 0
        assert llm.generator.stepper.use_graph == (graph != "0")
        prompt = torch.randint(0, llm.model_config.vocab_size, (3000,), generator=torch.Generator().manual_seed(0))
        return list(llm.stream_ids(prompt.tolist(), max_new_tokens=24))

    assert run("auto") == run("0")


def _tiered_tokens(monkeypatch, graph: str = "auto", **settings) -> tuple[list[int], dict]:
    """24 greedy tokens after a 40K-token prompt, with the KV cache tiered to pinned host memory
    behind a GPU page cache smaller than the prompt; and the store's report."""
    from lcrun import LLM
    from lcrun.runtime.tiered import TieredTopKCache
    monkeypatch.setenv("LCRUN_CUDA_GRAPH", graph)
    llm = LLM("synthetic:llama-3.2-1b", ctx="64k", attention="topk", budget=512, sink_tokens=32,
              window_tokens=128, gpu_mem="4GiB", progress=False, **settings)
    cache = llm.cache
    assert isinstance(cache, TieredTopKCache), f"the plan kept the KV cache on the GPU: {llm.plan}"
    prompt = torch.randint(0, llm.model_config.vocab_size, (40000,), generator=torch.Generator().manual_seed(0))
    ids = list(llm.stream_ids(prompt.tolist(), max_new_tokens=24))
    report = cache.report()
    report["host_dtype"] = cache.homes.host_kv.dtype
    cache.close()
    del llm, cache
    gc.collect()
    torch.cuda.empty_cache()
    return ids, report


def test_prefetch_never_changes_tokens_of_the_tiered_store(monkeypatch):
    """The next-layer prefetch (hidden-state predictor, on a side stream captured in the decode
    graph) moves pages early but never changes what is attended."""
    off, off_report = _tiered_tokens(monkeypatch, prefetch="off")
    hidden, hidden_report = _tiered_tokens(monkeypatch, prefetch="hidden")
    assert off_report["hit_rate"] < 1.0, "the GPU page cache must miss for this test to mean anything"
    assert hidden_report["prefetched_pages"] > 0
    assert hidden == off


def test_fp8_pages_of_the_tiered_store_graph_equals_eager(monkeypatch):
    """fp8 pages (host pool and GPU page cache, compiled write/admit/attend kernels): a decode step
    replayed as a CUDA graph gives the tokens eager decode gives, with a cache that misses."""
    graph, report = _tiered_tokens(monkeypatch, "auto", prefetch="off", kv_dtype="fp8")
    eager, _ = _tiered_tokens(monkeypatch, "0", prefetch="off", kv_dtype="fp8")
    assert report["hit_rate"] < 1.0 and report["kv_dtype"] == "float8_e4m3fn"
    assert report["host_dtype"] == torch.float8_e4m3fn
    assert graph == eager
