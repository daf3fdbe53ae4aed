"""Hierarchical page selection (lcrun.kernels.chunk_abstracts) and the folded plan, against their
torch references; and the paged cache's hierarchical mode against its flat mode.

Without CUDA the Triton kernels run in the interpreter (TRITON_INTERPRET set before lcrun's kernel
modules are imported). bf16 tests avoid tl.dot-only paths: the interpreter's bf16 dot is wrong.
"""

import pytest
import torch

from lcrun.kernels import plan_selection, reference  # noqa: E402

from triton_env import DEVICE, require_triton  # noqa: E402

require_triton()

from lcrun.kernels.chunk_abstracts import chunk_abstracts_like, select_top_pages_hier, update_chunk_abstracts  # noqa: E402,E501
from lcrun.kernels.score import score_pages  # noqa: E402
from lcrun.kernels.select_kernels import selection_bounds  # noqa: E402
from lcrun.kernels.topk import select_top_pages  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def i32(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int32, device=DEVICE)


def abstracts(hkv, max_pages, d, dtype, gen, hot=None, q=None):
    """Page abstracts of random pages (8 keys each); ``hot`` pages per head get keys along q."""
    keys = torch.randn(hkv, max_pages, 8, d, generator=gen)
    if hot is not None:
        direction = q.float().reshape(hkv, -1, d).mean(1).cpu()
        for h in range(hkv):
            keys[h, hot[h]] += 3.0 * direction[h]
    return keys.amin(2).to(dtype).to(DEVICE), keys.amax(2).to(dtype).to(DEVICE)


def pages_of(slots, lens, table):
    """Per head, the set of logical pages selected (entries with tokens)."""
    inverse = {}
    for h in range(table.shape[0]):
        for p, s in enumerate(table[h].tolist()):
            inverse[(h, s)] = p
    return [{inverse[(h, s)] for s, n in zip(slots[h].tolist(), lens[h].tolist()) if n > 0}
            for h in range(slots.shape[0])]


def assert_same_up_to_ties(got, ref, table, scores, tol=1e-4):
    """Same selected pages per head; a page in only one of them must tie (within tol, relative)
    with a page in only the other (fp32 sums in another order)."""
    assert torch.equal(got[1].sum(1), ref[1].sum(1)), (got[1], ref[1])
    for h, (a, b) in enumerate(zip(pages_of(*got, table), pages_of(*ref, table))):
        only_a, only_b = sorted(a - b), sorted(b - a)
        assert len(only_a) == len(only_b)
        for pa, pb in zip(sorted(only_a, key=lambda p: scores[h, p]), sorted(only_b, key=lambda p: scores[h, p])):
            sa, sb = scores[h, pa].item(), scores[h, pb].item()
            assert abs(sa - sb) <= tol * max(1.0, abs(sb)), (h, pa, sa, pb, sb)


# -- chunk abstracts -------------------------------------------------------------------------------

@pytest.mark.parametrize("cp,d,dtype,num_full", [(4, 64, F32, 23), (8, 128, F16, 40), (16, 64, BF16, 7),
                                                  (2, 128, F32, 1)])
def test_update_chunk_abstracts(cp, d, dtype, num_full):
    hkv, max_pages = 3, 41
    gen = torch.Generator().manual_seed(cp * d)
    kmin, kmax = abstracts(hkv, max_pages, d, dtype, gen)
    n_chunks = -(-max_pages // cp)
    cmin = torch.full((hkv, n_chunks, d), float("nan"), dtype=dtype, device=DEVICE)
    cmax = cmin.clone()
    pages = torch.tensor([0, num_full - 1, max_pages - 1, 1], dtype=torch.int32, device=DEVICE)
    update_chunk_abstracts(kmin, kmax, cmin, cmax, pages, i32(num_full), cp)
    ref_min, ref_max = cmin.clone(), cmax.clone()
    reference.update_chunk_abstracts(kmin, kmax, ref_min, ref_max, pages, i32(num_full), cp)
    touched = sorted({p // cp for p in pages.tolist()})
    for c in range(n_chunks):
        if c in touched:
            full = [p for p in range(c * cp, min((c + 1) * cp, max_pages)) if p < num_full]
            want_min = kmin[:, full].float().amin(1) if full else torch.full((hkv, d), float("inf"))
            want_max = kmax[:, full].float().amax(1) if full else torch.full((hkv, d), float("-inf"))
            assert torch.equal(cmin[:, c].float().cpu(), want_min.cpu())
            assert torch.equal(cmax[:, c].float().cpu(), want_max.cpu())
            assert torch.equal(ref_min[:, c], cmin[:, c]) and torch.equal(ref_max[:, c], cmax[:, c])
        else:
            assert cmin[:, c].isnan().all() and cmax[:, c].isnan().all()


@pytest.mark.parametrize("kernel,dtype", [("grid", BF16), ("mma", F16), ("mma", F32), ("grid", F32)])
def test_score_chunk_rows_and_the_folded_plan(kernel, dtype):
    """score_pages over chunk rows (row_pages) with the plan's candidates, folded or not."""
    hkv, g, d, P, cp = 2, 4, 64, 16, 4
    max_pages = 70
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(hkv * g, d, generator=gen).to(dtype).to(DEVICE)
    kmin, kmax = abstracts(hkv, max_pages, d, dtype, gen)
    cmin, cmax = chunk_abstracts_like(kmin, cp)
    for seq_len in (P * 61 + 5, P * 3, P * 70):
        num_full = i32(seq_len // P)
        update_chunk_abstracts(kmin, kmax, cmin, cmax, torch.arange(max_pages, dtype=torch.int32, device=DEVICE),
                               num_full, cp)
        plan = plan_selection(i32(seq_len), max_pages, P, 40, 100, 400, bounds_fn=selection_bounds)
        folded = plan_selection(i32(seq_len), max_pages, P, 40, 100, 400, fold=True)
        assert folded.bounds is None and torch.equal(folded.device_bounds(), plan.bounds)
        for rows, (lo_, hi_) in ((1, (kmin, kmax)), (cp, (cmin, cmax))):
            ref = reference.score_pages(q, lo_, hi_, num_full, candidates=plan.bounds, row_pages=rows)
            for cand in (plan.bounds, plan, folded):
                out = torch.full((hkv, lo_.shape[1]), float("nan"), device=DEVICE)
                got = score_pages(q, lo_, hi_, num_full, candidates=cand, row_pages=rows, kernel=kernel,
                                  block_pages=16, programs_per_head=2, out=out)
                assert torch.equal(got.isinf(), ref.isinf())
                fin = ref.isfinite()
                assert fin.any() or seq_len == P * 3
                assert torch.allclose(got[fin], ref[fin], rtol=1e-5, atol=1e-4)


def test_folded_plan_gives_the_same_fused_selection():
    hkv, P, max_pages = 3, 16, 300
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(hkv, max_pages, generator=gen).to(DEVICE)
    table = torch.randperm(hkv * max_pages, generator=gen).reshape(hkv, max_pages).to(torch.int32).to(DEVICE)
    for seq_len in (P * 300, P * 217 + 3, 40):
        plan = plan_selection(i32(seq_len), max_pages, P, 32, 64, 640, bounds_fn=selection_bounds)
        folded = plan_selection(i32(seq_len), max_pages, P, 32, 64, 640, fold=True)
        a = select_top_pages(scores, table, plan)
        b = select_top_pages(scores, table, folded)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -- hierarchical selection ------------------------------------------------------------------------

CASES = [  # P, G, d, dtype, chunk_pages, top_chunks, seq_len, hot pages per head
    (16, 1, 64, F32, 4, 4, 16 * 150 + 7, 0),
    (32, 3, 128, F16, 8, 2, 32 * 200 + 31, 5),
    (64, 4, 64, BF16, 4, 8, 64 * 120 + 1, 3),
    (32, 8, 128, F32, 16, 4, 32 * 257, 0),
    (16, 4, 128, BF16, 2, 16, 16 * 90 + 9, 8),
    (32, 4, 64, F16, 8, 1, 32 * 60 + 2, 0),
]


@pytest.mark.parametrize("P,g,d,dtype,cp,top_chunks,seq_len,hot", CASES)
@pytest.mark.parametrize("fold", [False, True])
def test_hier_selection_matches_reference(P, g, d, dtype, cp, top_chunks, seq_len, hot, fold):
    hkv = 2
    max_pages = -(-seq_len // P) + 5
    gen = torch.Generator().manual_seed(P + g + d + cp)
    q = torch.randn(hkv * g, d, generator=gen).to(dtype).to(DEVICE)
    hot_pages = [torch.randperm(max_pages - 10, generator=gen)[:hot] + 2 for _ in range(hkv)] if hot else None
    kmin, kmax = abstracts(hkv, max_pages, d, dtype, gen, hot_pages, q)
    table = torch.randperm(hkv * max_pages + 7, generator=gen)[:hkv * max_pages].reshape(hkv, max_pages)
    table = table.to(torch.int32).to(DEVICE)
    num_full = i32(seq_len // P)
    cmin, cmax = chunk_abstracts_like(kmin, cp)
    update_chunk_abstracts(kmin, kmax, cmin, cmax, torch.arange(max_pages, dtype=torch.int32, device=DEVICE),
                           num_full, cp)
    plan = plan_selection(i32(seq_len), max_pages, P, 2 * P, 3 * P + 5, 20 * P, bounds_fn=selection_bounds,
                          fold=fold)
    got = select_top_pages_hier(q, kmin, kmax, cmin, cmax, num_full, table, plan, cp, top_chunks)
    ref = reference.select_top_pages_hier(q, kmin, kmax, cmin, cmax, num_full, table, plan, cp, top_chunks)
    assert got[0].shape == ref[0].shape == (hkv, plan.kmax)
    scores = reference.score_pages(q, kmin, kmax, num_full)
    assert_same_up_to_ties(got, ref, table, scores)
    # Layout: [sinks | window | top | unused], unused entries zeroed.
    assert torch.equal((got[1] > 0).sum(1), (ref[1] > 0).sum(1))
    assert torch.equal(got[0][got[1] == 0], torch.zeros_like(got[0][got[1] == 0]))
    assert torch.equal(got[0][:, :2], ref[0][:, :2])  # sinks first
    if hot and top_chunks >= hot:  # hot pages win: their chunks rank first and hold them all
        sel = pages_of(*got, table)
        for h in range(hkv):
            bounds = plan.device_bounds().tolist()
            want = {p for p in hot_pages[h].tolist() if bounds[1] <= p < bounds[2]}
            assert want <= sel[h], (h, want - sel[h])


@pytest.mark.parametrize("P,cp,seq_len", [(16, 4, 16 * 100 + 3), (32, 8, 32 * 77), (64, 2, 64 * 33 + 63)])
def test_hier_equals_flat_when_every_chunk_competes(P, cp, seq_len):
    hkv, g, d = 3, 4, 64
    max_pages = -(-seq_len // P)
    gen = torch.Generator().manual_seed(seq_len)
    q = torch.randn(hkv * g, d, generator=gen).to(DEVICE)
    kmin, kmax = abstracts(hkv, max_pages, d, F32, gen)
    table = torch.randperm(hkv * max_pages, generator=gen).reshape(hkv, max_pages).to(torch.int32).to(DEVICE)
    num_full = i32(seq_len // P)
    cmin, cmax = chunk_abstracts_like(kmin, cp)
    update_chunk_abstracts(kmin, kmax, cmin, cmax, torch.arange(max_pages, dtype=torch.int32, device=DEVICE),
                           num_full, cp)
    plan = plan_selection(i32(seq_len), max_pages, P, P, 2 * P, 12 * P, bounds_fn=selection_bounds)
    n_chunks = cmin.shape[1]
    top_chunks = 1 << (n_chunks - 1).bit_length()
    hier = select_top_pages_hier(q, kmin, kmax, cmin, cmax, num_full, table, plan, cp, top_chunks)
    scores = score_pages(q, kmin, kmax, num_full, candidates=plan, kernel="grid")
    flat = select_top_pages(scores, table, plan)
    assert_same_up_to_ties(hier, flat, table, reference.score_pages(q, kmin, kmax, num_full))


def test_hier_selection_with_few_candidates_leaves_entries_unused():
    """Top chunks that hold fewer candidate pages than the budget allows: fewer top entries."""
    hkv, g, d, P, cp = 2, 2, 64, 16, 8
    seq_len = P * 64
    max_pages = 64
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(hkv * g, d, generator=gen).to(DEVICE)
    kmin, kmax = abstracts(hkv, max_pages, d, F32, gen)
    table = torch.arange(hkv * max_pages, dtype=torch.int32, device=DEVICE).reshape(hkv, max_pages)
    num_full = i32(seq_len // P)
    cmin, cmax = chunk_abstracts_like(kmin, cp)
    update_chunk_abstracts(kmin, kmax, cmin, cmax, torch.arange(max_pages, dtype=torch.int32, device=DEVICE),
                           num_full, cp)
    plan = plan_selection(i32(seq_len), max_pages, P, P, P, 40 * P, bounds_fn=selection_bounds)
    got = select_top_pages_hier(q, kmin, kmax, cmin, cmax, num_full, table, plan, cp, 1)
    ref = reference.select_top_pages_hier(q, kmin, kmax, cmin, cmax, num_full, table, plan, cp, 1)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert 0 < (got[1] > 0).sum(1).max() <= 1 + 2 + cp


# -- the paged cache's hierarchical mode -----------------------------------------------------------

def test_paged_cache_hier_mode():
    from lcrun.runtime.model_config import ModelConfig
    from lcrun.runtime.paged_cache import PagedTopKCache
    cfg = ModelConfig(arch="llama", vocab_size=64, hidden_size=256, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=10000.0)
    n = 200
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(cfg.num_layers, n, h, 64, generator=gen).to(DEVICE) for h in (4, 2, 2))
    settings = dict(page_size=16, budget=64, sink_tokens=16, window_tokens=16)
    caches = {"flat": PagedTopKCache(cfg, n, DEVICE, torch.float32, **settings),
              "all chunks": PagedTopKCache(cfg, n, DEVICE, torch.float32, chunk_pages=2, top_chunks=8, **settings),
              "few chunks": PagedTopKCache(cfg, n, DEVICE, torch.float32, chunk_pages=2, top_chunks=2, **settings),
              "torch": PagedTopKCache(cfg, n, DEVICE, torch.float32, chunk_pages=2, top_chunks=2, backend="torch",
                                      **settings)}
    outs = {}
    for name, cache in caches.items():
        outs[name] = []
        for size in (150, 1, 1, 1, 17, 1):
            start = cache.length
            cache.begin_forward(torch.arange(start, start + size, device=DEVICE))
            outs[name].append([cache.attend(layer, q[layer, start:start + size], k[layer, start:start + size],
                                            v[layer, start:start + size]) for layer in range(cfg.num_layers)])
            cache.end_forward()
    for step in range(6):
        for layer in range(cfg.num_layers):
            flat = outs["flat"][step][layer]
            assert torch.allclose(outs["all chunks"][step][layer], flat, atol=1e-5, rtol=1e-4)
            assert torch.allclose(outs["few chunks"][step][layer], outs["torch"][step][layer], atol=1e-5, rtol=1e-4)
    # chunk abstracts match a rebuild from the page abstracts
    cache = caches["few chunks"]
    for layer in range(cfg.num_layers):
        cmin, cmax = chunk_abstracts_like(cache.kmin[layer], 2)
        reference.update_chunk_abstracts(cache.kmin[layer], cache.kmax[layer], cmin, cmax,
                                         torch.arange(cache.max_pages, dtype=torch.int32, device=DEVICE),
                                         i32(cache.length // 16), 2)
        full_chunks = cache.length // 16 // 2
        assert torch.equal(cmin[:, :full_chunks], cache.cmin[layer][:, :full_chunks])
        assert torch.equal(cmax[:, :full_chunks], cache.cmax[layer][:, :full_chunks])


@pytest.mark.parametrize("P,cp,top_chunks,seq_len,budget_pages", [
    (16, 2, 8, 16 * 700 + 5, 20),    # 351 chunks > 128 leader groups: leaders compete
    (16, 8, 32, 16 * 400, 100),      # 100 top pages of 256 candidates: the threshold keeps > CAP, sort fallback
    (16, 8, 32, 16 * 400, 70),       # ~67 top pages: 64-128 keys pass, ranked in the full-size block
])
def test_hier_selection_leaders_and_fallback(P, cp, top_chunks, seq_len, budget_pages):
    hkv, g, d = 2, 4, 64
    max_pages = -(-seq_len // P)
    gen = torch.Generator().manual_seed(seq_len)
    q = torch.randn(hkv * g, d, generator=gen).to(DEVICE)
    kmin, kmax = abstracts(hkv, max_pages, d, F32, gen)
    table = torch.randperm(hkv * max_pages, generator=gen).reshape(hkv, max_pages).to(torch.int32).to(DEVICE)
    num_full = i32(seq_len // P)
    cmin, cmax = chunk_abstracts_like(kmin, cp)
    update_chunk_abstracts(kmin, kmax, cmin, cmax, torch.arange(max_pages, dtype=torch.int32, device=DEVICE),
                           num_full, cp)
    plan = plan_selection(i32(seq_len), max_pages, P, P, P, budget_pages * P, fold=True)
    got = select_top_pages_hier(q, kmin, kmax, cmin, cmax, num_full, table, plan, cp, top_chunks)
    ref = reference.select_top_pages_hier(q, kmin, kmax, cmin, cmax, num_full, table, plan, cp, top_chunks)
    assert_same_up_to_ties(got, ref, table, reference.score_pages(q, kmin, kmax, num_full))
    assert int((got[1] > 0).sum(1).min()) >= budget_pages - 2


def test_runtime_cache_is_hierarchical_only_for_long_contexts():
    """make_cache (all KV on the device) builds flat selection up to AUTO_MIN_PAGES pages per KV
    head and hierarchical selection (chunk abstracts) from there, where flat scoring costs more."""
    from lcrun.construct import make_cache
    from lcrun.config import LcrunConfig
    from lcrun.kernels.chunk_abstracts import AUTO_MIN_PAGES, CHUNK_PAGES
    from lcrun.runtime.model_config import ModelConfig
    cfg = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=1 << 20)
    for pages, chunked in ((AUTO_MIN_PAGES - 1, 0), (AUTO_MIN_PAGES, CHUNK_PAGES)):
        config = LcrunConfig(attention="topk", ctx=pages * 32, page_size=32, positions="true")
        cache = make_cache(config, cfg, torch.device("cpu"), torch.float32)
        assert cache.chunk_pages == chunked
