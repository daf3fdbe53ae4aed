"""The tiered store (GPU page cache over host homes) computes what the dense cache computes while
the budget covers the context, and keeps working when the cache is far smaller than the context.
On the CPU the same code runs with the torch references of the tiered kernels."""
from __future__ import annotations

import pytest
import torch

from lcrun.offload.host_pool import pinned_bytes_in_use
from lcrun.runtime.kv_cache import DenseCache
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.tiered import TieredTopKCache

CFG = ModelConfig(arch="llama", vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=2,
                  num_heads=8, num_kv_heads=2, head_dim=32, max_position_embeddings=4096)


def _run(cache, qkv_steps):
    """Each step one forward of all layers; prompts (T > 1) layer by layer where the cache prefills
    that way (each step's q/k/v serve every layer, so layer-major order gives the same calls)."""
    outs = []
    for q, k, v in qkv_steps:
        pos = torch.arange(cache.length, cache.length + q.shape[0])
        if q.shape[0] > 1 and cache.layerwise_prefill:
            cache.begin_layerwise(pos)
        else:
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
                             budget=256, sink_tokens=16, window_tokens=32, backend="torch")
    got = _run(tiered, steps)
    for a, b in zip(got, dense):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    report = tiered.report()
    assert report["decode_steps"] == 12 and report["selected_pages"] > 0
    if cache_slots == 1000:  # a cache that holds everything: after the first step, all hits
        assert report["hit_rate"] > 0.8
    tiered.close()


def test_fp8_pages_stay_close_to_dense_and_take_a_quarter_of_fp32():
    """fp8 pages (per-head scales from the first prompt; heads and steps of very different sizes)
    through prefill, host reads and decode: attention within e4m3's rounding of the dense result
    while the budget covers the context; host pool and page cache hold 1-byte elements."""
    steps = _steps([37, 50, 21], decode=12, seed=3)
    k_size, v_size = torch.tensor([0.05, 2.0]).view(1, 2, 1), torch.tensor([0.01, 30.0]).view(1, 2, 1)  # per KV head
    steps = [(q, k * k_size, v * v_size) for q, k, v in steps]
    dense = _run(DenseCache(CFG, 160, "cpu", torch.float32), steps)
    args = dict(cache_slots_per_layer=6, page_size=16, budget=256, sink_tokens=16, window_tokens=32, backend="torch")
    exact = TieredTopKCache(CFG, 160, "cpu", torch.float32, **args)
    fp8 = TieredTopKCache(CFG, 160, "cpu", torch.float32, kv_dtype=torch.float8_e4m3fn, **args)
    got = _run(fp8, steps)
    for a, b in zip(got[1:], dense[1:]):
        err = ((a - b).norm() / b.norm()).item()
        assert 1e-4 < err < 0.08  # lossy by e4m3 rounding: ~2.5% per element on random data, K and V
    assert fp8.homes.host_kv.dtype == fp8.pages.gpu_k.dtype == torch.float8_e4m3fn
    assert fp8.codec.page_bytes * 4 == exact.codec.page_bytes  # (host slots round up to 4 KiB for direct I/O)
    assert fp8.pages.gpu_k.nbytes * 4 == exact.pages.gpu_k.nbytes
    scales = fp8.codec.kv_scale[:, :, :2]
    assert torch.equal(torch.exp2(torch.log2(scales).round()), scales)  # powers of two
    assert (scales[:, 1] > 20 * scales[:, 0]).all()  # each head its own scales (K 40x, V 3000x larger)
    report = fp8.report()
    assert report["kv_dtype"] == "float8_e4m3fn" and report["decode_steps"] == 12
    exact.close()
    fp8.close()


@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn])
def test_hierarchical_selection_matches_the_paged_cache(kv_dtype):
    """chunk_pages > 0: the tiered store selects like the on-GPU paged cache with the same chunk
    abstracts (pages of the best chunks only), kept up to date through prefill and decode, so with
    pages in the model dtype the outputs are the same; fp8 pages stay close. (fp8: the second
    prompt starts a page. A page it continued would take its abstract from its stored past, fp8
    codes, which can flip a near tie between pages against the paged cache's exact abstracts.)"""
    from lcrun.runtime.paged_cache import PagedTopKCache
    prompts = [200, 37] if kv_dtype is None else [192, 45]
    steps = _steps(prompts, decode=40, seed=4)  # 17 pages per head at 16 tokens; chunks of 2 pages
    sel = dict(page_size=16, budget=96, sink_tokens=16, window_tokens=32, chunk_pages=2, top_chunks=2)
    paged = PagedTopKCache(CFG, 320, "cpu", torch.float32, backend="torch", **sel)
    tiered = TieredTopKCache(CFG, 320, "cpu", torch.float32, cache_slots_per_layer=24,
                             backend="torch", kv_dtype=kv_dtype, **sel)
    flat = TieredTopKCache(CFG, 320, "cpu", torch.float32, cache_slots_per_layer=24,
                           backend="torch", **dict(sel, chunk_pages=0))
    want, got, got_flat = _run(paged, steps), _run(tiered, steps), _run(flat, steps)
    assert tiered.report()["selection"] == "hierarchical 2x2" and flat.report()["selection"] == "flat"
    for a, b in zip(got, want):
        if kv_dtype is None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            assert ((a - b).norm() / b.norm()).item() < 0.08
    # ... and not like flat selection, which scores every page (or the test would not tell).
    assert any(not torch.allclose(a, b, atol=1e-3) for a, b in zip(got_flat[2:], want[2:]))
    tiered.close()
    flat.close()


def test_small_budget_selects_and_reports():
    steps = _steps([200], decode=10, seed=1)
    tiered = TieredTopKCache(CFG, 256, "cpu", torch.float32, cache_slots_per_layer=64, page_size=16,
                             budget=96, sink_tokens=16, window_tokens=32, backend="torch")
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


def test_prompts_run_layer_by_layer_only():
    """The store prefills through begin_layerwise (as the Generator does); a multi-token forward
    through begin_forward is refused with an error that says so."""
    tiered = TieredTopKCache(CFG, 128, "cpu", torch.float32, cache_slots_per_layer=8, page_size=16, backend="torch")
    with pytest.raises(RuntimeError, match="begin_layerwise"):
        tiered.begin_forward(torch.arange(5))
    q, k, v = _steps([5], decode=0)[0]
    tiered.begin_forward(torch.arange(1))
    with pytest.raises(RuntimeError, match="begin_layerwise"):
        tiered.attend(0, q, k, v)
    tiered.close()


def test_prefill_leaves_the_gpu_page_cache_full_of_the_pages_decode_will_want():
    """After a prefill (which empties the cache to stage K/V in its memory) every slot holds the
    page of highest warm score mapping to it, bit-exact from the host pool: the sinks and the local
    window of every head, then the pages the prompt's last query scores highest. The first decode
    step then hits, and its output is what a cold cache computes."""
    steps = _steps([200], decode=1, seed=3)
    kw = dict(page_size=16, budget=96, sink_tokens=16, window_tokens=32, backend="torch")
    warm = TieredTopKCache(CFG, 256, "cpu", torch.float32, cache_slots_per_layer=20, **kw)  # 26 pages per layer
    _run(warm, steps[:1])
    pages, P = warm.pages, 16
    n_pages = -(-200 // P)
    for layer in range(CFG.num_layers):
        q_last = steps[0][0][-1]
        scores = warm.selector.warm_scores(layer, warm.rotary.rotate(q_last[None], torch.tensor([199]))[0], 200)
        tag = pages.tag[layer]
        for s in range(pages.slots):
            mapped = (pages.cache_slot.flatten() == s).nonzero().flatten()
            mapped = mapped[mapped % warm.max_pages < n_pages]
            if not len(mapped):  # no page of the prompt maps here
                assert tag[s] == -1
                continue
            assert int(tag[s]) in mapped.tolist()
            assert scores.flatten()[int(tag[s])] == scores.flatten()[mapped].max()
            h, p = divmod(int(tag[s]), warm.max_pages)
            host = warm.homes.host_kv[layer][warm.homes.host_slot[layer, h, p]]
            assert torch.equal(pages.gpu_k[layer, s], host[0]) and torch.equal(pages.gpu_v[layer, s], host[1])
        for h in range(CFG.num_kv_heads):  # the sink page and the window's pages are always kept
            for p in (0, (200 - 32) // P, n_pages - 1):
                assert int(tag[pages.cache_slot[h, p]]) == h * warm.max_pages + p
    out = _run(warm, steps[1:])
    assert warm.report()["cache_hits"] > 0
    cold = TieredTopKCache(CFG, 256, "cpu", torch.float32, cache_slots_per_layer=20, **kw)
    _run(cold, steps[:1])
    cold.pages.tag.fill_(-1)
    torch.testing.assert_close(out, _run(cold, steps[1:]), rtol=0, atol=0)
    warm.close()
    cold.close()
