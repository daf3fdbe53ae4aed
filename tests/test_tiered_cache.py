"""The tiered store (GPU page cache over host homes) computes what the dense cache computes while
the budget covers the context, and keeps working when the cache is far smaller than the context.
On the CPU the same code runs with the torch references of the tiered kernels."""
from __future__ import annotations

import pytest
import torch

from lcrun.offload.host_pool import pinned_bytes_in_use
from lcrun.runtime.kv_cache import DenseCache
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.tiered_cache import TieredTopKCache

CFG = ModelConfig(arch="llama", vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=2,
                  num_heads=8, num_kv_heads=2, head_dim=32, max_position_embeddings=4096)


def _run(cache, qkv_steps):
    outs = []
    for q, k, v in qkv_steps:
        pos = torch.arange(cache.length, cache.length + q.shape[0])
        cache.begin_forward(pos)
        outs.append(torch.stack([cache.attend(layer, q, k, v) for layer in range(CFG.num_layers)]))
        cache.end_forward()
    return outs


def _steps(chunks, decode, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda t: (torch.randn(t, 8, 32, generator=g), torch.randn(t, 2, 32, generator=g),  # noqa: E731
                    torch.randn(t, 2, 32, generator=g))
    return [mk(t) for t in chunks] + [mk(1) for _ in range(decode)]


@pytest.mark.parametrize("cache_slots", [4, 40, 1000])
def test_equals_dense_when_budget_covers_context(cache_slots):
    steps = _steps([37, 50, 21], decode=12)      # 108 + 12 tokens: pages partial at every boundary
    dense = _run(DenseCache(CFG, 160, "cpu", torch.float32), steps)
    tiered = TieredTopKCache(CFG, 160, "cpu", torch.float32, cache_slots_per_layer=cache_slots, page_size=16,
                             budget=256, sink_tokens=16, window_tokens=32, prefill_block=32, backend="torch")
    got = _run(tiered, steps)
    for a, b in zip(got, dense):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    report = tiered.report()
    assert report["decode_steps"] == 12 and report["selected_pages"] > 0
    if cache_slots == 1000:  # a cache that holds everything: after the first step, all hits
        assert report["hit_rate"] > 0.8
    tiered.close()


def test_small_budget_selects_and_reports():
    steps = _steps([200], decode=10, seed=1)
    tiered = TieredTopKCache(CFG, 256, "cpu", torch.float32, cache_slots_per_layer=64, page_size=16,
                             budget=96, sink_tokens=16, window_tokens=32, prefill_block=64, backend="torch")
    dense = _run(DenseCache(CFG, 256, "cpu", torch.float32), steps)
    got = _run(tiered, steps)
    torch.testing.assert_close(got[0], dense[0], rtol=1e-4, atol=1e-4)   # prefill is exact
    assert not torch.allclose(got[-1], dense[-1], atol=1e-3)              # decode is sparse
    # steps x layers x heads x pages within the budget (one more for a partial last page)
    assert 0 < tiered.report()["selected_pages"] <= 10 * 2 * 2 * (96 // 16 + 1)
    tiered.close()


def test_host_pool_released_on_close():
    before = pinned_bytes_in_use()
    tiered = TieredTopKCache(CFG, 128, "cpu", torch.float32, cache_slots_per_layer=8, page_size=16, backend="torch")
    assert pinned_bytes_in_use() > before
    tiered.close()
    assert pinned_bytes_in_use() == before
