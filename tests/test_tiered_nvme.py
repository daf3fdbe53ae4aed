"""Layer-by-layer prefill and the NVMe tier of the tiered store, with real page files.

On the CPU the tiered kernels run as their torch references and the host pool is plain memory; the
NVMe tier writes and reads real files under a temporary --kv-dir."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lcrun.errors import ConfigError
from lcrun.eval.harness import tier_counts
from lcrun.offload.movers import Promoter
from lcrun.offload.nvme_store import NvmeStore
from lcrun.offload.page_directory import PageDirectory
from lcrun.runtime.build import random_model
from lcrun.runtime.generate import Generator
from lcrun.runtime.kv_cache import DenseCache
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.paged_cache import PagedTopKCache
from lcrun.runtime.sampling import SamplingParams
from lcrun.runtime.tiered import TieredTopKCache

CFG = ModelConfig(arch="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=8, num_kv_heads=2, head_dim=32, max_position_embeddings=4096)
P = 16


def _tiered(capacity, tmp_path=None, host=None, **kw):
    args = dict(cache_slots_per_layer=8, page_size=P, budget=512, sink_tokens=16, window_tokens=32, backend="torch")
    if host:
        args.update(host_slots_per_layer=host, kv_dir=str(tmp_path), promotion_reserve=8)
    args.update(kw)
    return TieredTopKCache(CFG, capacity, "cpu", torch.float32, **args)


@pytest.mark.parametrize("host", [None, 40])
def test_layerwise_prefill_equals_dense_over_two_turns(tmp_path, host):
    """Prompts of 300 then +70 tokens (chunks of 64, pages of 16: every boundary partial); with
    host=40 slots per layer, 38 of 48 pages per layer cannot stay in the host pool."""
    model = random_model(CFG, "cpu", torch.float32, seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (300,), generator=g).tolist()
    ids2 = ids + torch.randint(0, 128, (70,), generator=g).tolist()
    dense = Generator(model, DenseCache(CFG, 512, "cpu", torch.float32), 64)
    cache = _tiered(512, tmp_path, host)
    tiered = Generator(model, cache, 64)
    for prompt in (ids, ids2):
        torch.testing.assert_close(tiered.prefill(prompt), dense.prefill(prompt), rtol=1e-5, atol=1e-5)
    if host:
        report = cache.report()
        assert report["prefill_nvme_pages_written"] > 0 and report["nvme_bytes_written"] > 0
        assert report["prefill_nvme_read_bytes"] > 0  # the second turn staged the spilled past
        assert os.listdir(tmp_path)  # the private page folder exists while the cache lives
    cache.close()
    assert not os.listdir(tmp_path)  # and is removed on close


def test_new_conversations_reuse_the_nvme_tier(tmp_path):
    """One spilling cache serves several unrelated prompts (a server's requests, an eval's trials):
    each prompt after a reset, with decode steps that promote pages in between, gives the tokens of
    a fresh store that holds every page in the host pool; pages past the new end and rewritten
    pages give back their host and disk slots (a page file of one context's pages is enough)."""
    model = random_model(CFG, "cpu", torch.float32, seed=0)
    args = dict(budget=256, prefetch="off")  # 16 pages per head: the pool's 40 slots hold a step's selection
    cache = _tiered(512, tmp_path, 40, nvme_slots=CFG.num_layers * CFG.num_kv_heads * 32, **args)
    cache.settler.wait_s, cache.settler.max_redos = 60.0, 10_000  # every late page is waited for, however slow the box
    tiered = Generator(model, cache, 64)
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    g = torch.Generator().manual_seed(5)
    for n in (480, 400, 480, 200):
        ids = torch.randint(0, 128, (n,), generator=g).tolist()
        tiered.reset()
        host_only = _tiered(512, **args)
        assert list(tiered.stream(ids, greedy)) == list(Generator(model, host_only, 64).stream(ids, greedy)), n
        host_only.close()
    report = cache.report()
    assert report["prefill_nvme_pages_written"] > 0 and report["redone_steps"] > 0
    counts = tier_counts(report)  # what lcrun eval records per trial
    assert counts["late_pages"] > 0 and counts["redone_steps"] > 0 and counts["nvme_wait_ms"] > 0
    assert tier_counts(host_only.report())["late_pages"] == 0
    assert tier_counts(PagedTopKCache(CFG, 64, "cpu", torch.float32).report()) == {}
    cache.close()


def test_fp8_pages_through_nvme_over_two_turns(tmp_path):
    """fp8 pages spilled to page files and read back (the second turn stages its past from the host
    pool and NVMe): each turn's logits stay within e4m3's rounding of dense, and greedy decode
    after it runs (the NVMe files hold the same codes as the host pool)."""
    model = random_model(CFG, "cpu", torch.float32, seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (300,), generator=g).tolist()
    ids2 = ids + torch.randint(0, 128, (70,), generator=g).tolist()
    dense = Generator(model, DenseCache(CFG, 512, "cpu", torch.float32), 64)
    cache = _tiered(512, tmp_path, 40, kv_dtype=torch.float8_e4m3fn)
    tiered = Generator(model, cache, 64)
    want = dense.prefill(ids)
    torch.testing.assert_close(tiered.prefill(ids), want, rtol=1e-5, atol=1e-5)  # a first prompt attends exactly
    want, got = dense.prefill(ids2), tiered.prefill(ids2)
    err = ((got - want).norm() / want.norm()).item()
    assert 0 < err < 0.02  # the past came back through fp8 pages
    report = cache.report()
    assert report["prefill_nvme_read_bytes"] > 0 and report["kv_dtype"] == "float8_e4m3fn"
    greedy = SamplingParams(max_new_tokens=4, temperature=0)
    assert len(list(tiered.stream(ids2 + [5], greedy))) == 4
    cache.close()


def test_host_only_decode_after_layerwise_prefill_equals_dense():
    model = random_model(CFG, "cpu", torch.float32, seed=2)
    ids = torch.randint(0, 128, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    greedy = SamplingParams(max_new_tokens=16, temperature=0)
    want = list(Generator(model, DenseCache(CFG, 256, "cpu", torch.float32), 64).stream(ids, greedy))
    cache = _tiered(256)
    assert list(Generator(model, cache, 64).stream(ids, greedy)) == want
    cache.close()


def _qkv(t, g):
    return (torch.randn(t, 8, 32, generator=g), torch.randn(t, 2, 32, generator=g), torch.randn(t, 2, 32, generator=g))


def test_nvme_pages_are_promoted_one_step_behind(tmp_path):
    """Far pages live on NVMe after prefill: the first decode step finds its selected far pages
    unreadable; after the promoter has run, the same query attends exactly what the all-on-device
    paged cache attends (so promoted pages came back bit-exact)."""
    g = torch.Generator().manual_seed(4)
    T = 400
    prompt = _qkv(T, g)
    budget = 16 + 32 + 4 * P  # sinks + window + 4 scored pages
    # Host: 12 pages per head kept after prefill (sinks 1 + recent 11) of 25; reserve 16 slots.
    tiered = _tiered(512, tmp_path, host=40, budget=budget, promotion_reserve=16)
    paged = PagedTopKCache(CFG, 512, "cpu", torch.float32, page_size=P, budget=budget, sink_tokens=16,
                           window_tokens=32, backend="torch")
    pos = torch.arange(T)
    tiered.begin_layerwise(pos)
    for layer in range(CFG.num_layers):
        for c0 in range(0, T, 64):
            tiered.attend(layer, *(x[c0:c0 + 64] for x in prompt))
    tiered.end_forward()
    paged.begin_forward(pos)
    for layer in range(CFG.num_layers):
        paged.attend(layer, *prompt)
    paged.end_forward()
    assert tiered.report()["prefill_nvme_pages_written"] > 0

    q = torch.randn(1, 8, 32, generator=g) * 4
    outs = []
    for step in range(3):
        k, v = torch.randn(1, 2, 32, generator=g), torch.randn(1, 2, 32, generator=g)
        got, want = [], []
        for cache, sink in ((tiered, got), (paged, want)):
            cache.begin_forward(torch.tensor([T + step]))
            sink += [cache.attend(layer, q, k, v) for layer in range(CFG.num_layers)]
            cache.end_forward()
        tiered.homes.promoter.wait_idle()
        outs.append((torch.stack(got), torch.stack(want), int(tiered.stats.unreadable)))
    first_unreadable = outs[0][2]
    assert first_unreadable > 0
    assert outs[2][2] == first_unreadable  # nothing unreadable once promoted
    torch.testing.assert_close(outs[2][0], outs[2][1], rtol=1e-5, atol=1e-5)
    report = tiered.report()
    assert report["promoted_pages"] >= first_unreadable // 2 and report["decode_nvme_read_bytes_per_token"] > 0
    tiered.close()
    paged.close() if hasattr(paged, "close") else None


def test_spilling_without_kv_dir_is_a_clear_error():
    with pytest.raises(ConfigError, match="--kv-dir"):
        TieredTopKCache(CFG, 512, "cpu", torch.float32, cache_slots_per_layer=8, page_size=P,
                        host_slots_per_layer=40, backend="torch")


def test_host_pool_too_small_for_sinks_and_window(tmp_path):
    with pytest.raises(ConfigError, match="--host-mem"):
        _tiered(512, tmp_path, host=8, promotion_reserve=4)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["assign", "spill", "release", "recycle"]), st.integers(0, 2),
                          st.integers(1, 6)), max_size=40))
def test_page_directory_never_double_maps(ops):
    d = PageDirectory(num_layers=3, num_heads=2, max_pages=8, host_slots_per_layer=10, nvme_slots=48)
    released = {layer: [] for layer in range(3)}
    for op, layer, n in ops:
        host = d.host_resident(layer)
        if op == "assign":
            flats = np.flatnonzero(~host)[:min(n, d.free_host_slots(layer))]
            d.assign_host(layer, flats)
        elif op == "spill":
            flats = np.flatnonzero(host & (d.nvme_map[layer] < 0))[:n]
            d.assign_nvme(layer, flats)
        elif op == "release":
            flats = np.flatnonzero(host & (d.nvme_map[layer] >= 0))[:n]
            released[layer].append(d.release_host(layer, flats))
        elif released[layer]:
            d.recycle(layer, released[layer].pop())
        for lay in range(3):
            mapped = d.host_map[lay][d.host_map[lay] >= 0]
            assert len(set(mapped.tolist())) == mapped.size  # no slot holds two pages
            pending = sum(len(s) for s in released[lay])
            assert mapped.size + pending + d.free_host_slots(lay) == 10  # no slot lost or duplicated
        nv = d.nvme_map[d.nvme_map >= 0]
        assert len(set(nv.tolist())) == nv.size


def test_a_selection_larger_than_the_free_host_slots_is_promoted_after_evictions(tmp_path):
    """One layer, one head, 8 host slots all holding pages 0-7 (on disk too), a reserve of 4: a
    selection of pages 8-13 (on NVMe only) finds no free slot. The promoter defers them, evicts
    the least recently used unselected pages, and wakes the waiter only after that; once the main
    thread has applied the unmaps and recycled the slots, the same selection handed over again
    promotes pages, and their bytes come back from disk."""
    d = PageDirectory(num_layers=1, num_heads=1, max_pages=16, host_slots_per_layer=8, nvme_slots=16)
    store = NvmeStore(str(tmp_path), 4096, 16)
    host = torch.zeros(1, 8, 4096, dtype=torch.uint8)
    pages = torch.arange(16, dtype=torch.uint8)[:, None].expand(16, 4096).contiguous()
    d.assign_host(0, np.arange(8))
    host[0, :8] = pages[:8]
    on_disk = np.arange(16)
    store.write(d.assign_nvme(0, on_disk).tolist(), pages[on_disk])
    d.host_map[0, 8:] = -1
    promoter = Promoter(d, store, host, reserve_per_layer=4, protected_fn=lambda n: np.zeros(16, dtype=bool), pin=False)
    promoter.start((1, 1, 6))
    selection = torch.arange(8, 14, dtype=torch.int32).view(1, 1, 6)
    try:
        def hand_over():
            buf = promoter.free_buffer(5.0)
            promoter.sel_buffers[buf].copy_(selection)
            seq = promoter.submit(1, 200, buf, None)
            assert promoter.wait_promoted(seq, 30.0)
            return seq, promoter.drain()

        seq, updates = hand_over()
        assert promoter.deferred(seq) == 6 and all(released is not None for *_, released in updates)
        evicted = np.concatenate([flats for _, flats, _, _ in updates])
        assert evicted.size == 4 and (d.host_map[0, evicted] < 0).all() and d.free_host_slots(0) == 0
        for layer, _, _, released in updates:
            promoter.released(None, layer, released)
        promoter.recycle_released(wait=True)
        assert d.free_host_slots(0) == 4
        seq, updates = hand_over()
        promoted = [(flats, slots) for _, flats, slots, released in updates if released is None]
        (flats, slots), = promoted
        assert flats.size == 2 and promoter.deferred(seq) == 4  # two free slots stay for decode's new pages
        for f, slot in zip(flats.tolist(), slots.tolist()):
            assert d.host_map[0, f] == slot and bool((host[0, slot] == f).all())
    finally:
        promoter.close()
        store.close()


def _sparse_reference(q, k, v, pos0, t, sink, window, budget, group_score="max"):
    """Chunk [pos0, pos0 + t) of layer-wise sparse prefill by explicit masks (fp32, post-RoPE q/k)."""
    hkv, g, d = 2, 4, 32
    w0 = max(0, pos0 - window) // P * P
    far = w0 // P
    sinks = min(-(-sink // P), far)
    top = max(0, (budget - window) // P - sinks)
    kp = k[:far * P].view(far, P, hkv, d)
    kmin, kmax = kp.amin(1).transpose(0, 1), kp.amax(1).transpose(0, 1)        # (Hkv, far, D)
    qc = q[pos0:pos0 + t].view(t, hkv, g, d)
    bound = torch.maximum(qc[:, :, :, None, :] * kmin[None, :, None], qc[:, :, :, None, :] * kmax[None, :, None]).sum(-1)
    scores = bound.mean(0)[:, :, sinks:]                                        # (Hkv, g, far - sinks)
    scores = scores.amax(1) if group_score == "max" else scores.sum(1)
    chosen = scores.topk(min(top, far - sinks), dim=1).indices + sinks if top and far > sinks else None
    out = torch.empty(t, hkv * g, d)
    for h in range(hkv):
        allowed = torch.zeros(pos0 + t, dtype=torch.bool)
        allowed[:sinks * P] = True
        allowed[w0:pos0] = True
        if chosen is not None:
            for p in chosen[h].tolist():
                allowed[p * P:(p + 1) * P] = True
        for i in range(t):
            mask = allowed.clone()
            mask[pos0:pos0 + i + 1] = True
            keys, vals = k[:pos0 + t, h][mask], v[:pos0 + t, h][mask]
            qi = q[pos0 + i].view(hkv, g, d)[h]
            w = torch.softmax(qi @ keys.T / d ** 0.5, dim=-1)
            out[i, h * g:(h + 1) * g] = w @ vals
    return out


def test_sparse_prefill_attends_sinks_window_and_top_pages():
    from lcrun.runtime.rope import Rotary
    g = torch.Generator().manual_seed(5)
    T, chunk = 300, 64
    q, k, v = _qkv(T, g)
    cache = _tiered(512, budget=160, sparse_prefill=True)
    cache.begin_layerwise(torch.arange(T))
    outs = {}
    for layer in range(CFG.num_layers):
        for c0 in range(0, T, chunk):
            out = cache.attend(layer, q[c0:c0 + chunk], k[c0:c0 + chunk], v[c0:c0 + chunk])
            if layer == 0:
                outs[c0] = out
    cache.end_forward()
    rot = Rotary(CFG, "cpu")
    qr, kr = rot.rotate(q, torch.arange(T)), rot.rotate(k, torch.arange(T))
    for c0 in (0, 128, 256):  # exact (past within budget), then sparse
        want = _sparse_reference(qr, kr, v, c0, min(chunk, T - c0), 16, 32, 160) if c0 > 160 else None
        if want is None:
            dense = DenseCache(CFG, 512, "cpu", torch.float32)
            dense.begin_forward(torch.arange(c0 + chunk))
            want = dense.attend(0, q[:c0 + chunk], k[:c0 + chunk], v[:c0 + chunk])[c0:]
        torch.testing.assert_close(outs[c0], want, rtol=1e-4, atol=1e-4)
    cache.close()


def test_sparse_prefill_gives_the_last_prompt_token_its_own_selection():
    # Sparse prefill selects per chunk; the last prompt token (it picks the first answer token)
    # is run as a decode step instead, over every page within the budget.
    model = random_model(CFG, "cpu", torch.float32, seed=6)
    ids = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(7)).tolist()
    cache = _tiered(512, budget=160, sparse_prefill=True)
    got = Generator(model, cache, 64).prefill(ids)
    assert cache.length == 300
    ref_cache = _tiered(512, budget=160, sparse_prefill=True)
    model.forward_layerwise(torch.tensor(ids[:-1]), ref_cache, 64)
    want = model.forward(torch.tensor(ids[-1:]), ref_cache)
    torch.testing.assert_close(got, want.reshape(-1), rtol=1e-5, atol=1e-5)
    cache.close()
    ref_cache.close()


# -- NVMe pages in the decode loop: late pages wait, and the step runs again -----------------------

DECODE_BUDGET = 16 + 32 + 4 * P  # sinks + window + 4 scored pages


def _decode_run(tmp_path, host, n=24, wait_s=None, device="cpu", **kw):
    """Greedy tokens after a 400-token prompt (25 pages per head; with host=40 slots per layer, the
    pages between the sinks and the last 11 live on NVMe after prefill) and the cache's report."""
    model = random_model(CFG, device, torch.float32, seed=0)
    ids = torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(1)).tolist()
    args = dict(cache_slots_per_layer=8, page_size=P, budget=DECODE_BUDGET, sink_tokens=16, window_tokens=32,
                backend="torch" if device == "cpu" else "auto", prefetch="off")
    if host:
        args.update(host_slots_per_layer=host, kv_dir=str(tmp_path), promotion_reserve=16)
    args.update(kw)
    cache = TieredTopKCache(CFG, 512, device, torch.float32, **args)
    if wait_s is not None:
        cache.settler.wait_s = wait_s
    try:
        gen = Generator(model, cache, 64)
        tokens = list(gen.stream(ids, SamplingParams(max_new_tokens=n, temperature=0)))
        return tokens, {**cache.report(), "cuda_graph": gen.stepper.graph is not None}
    finally:
        cache.close()


@pytest.fixture(scope="module")
def host_only_run(tmp_path_factory):
    return _decode_run(tmp_path_factory.mktemp("kv"), None)


def test_decode_with_nvme_in_the_loop_equals_host_only(tmp_path, host_only_run):
    """Every token's step waits for its late pages and runs again: the tokens are those of the same
    store with every page in the host pool, although pages had to come from disk all along."""
    want, host_report = host_only_run
    got, report = _decode_run(tmp_path, 40)
    assert got == want
    assert report["late_pages"] > 0 and report["redone_steps"] > 0 and report["promoted_pages"] > 0
    assert report["skipped_pages"] == 0 and report["unreadable_selected_pages"] == 0
    assert report["nvme_wait_ms_per_token"] > 0 and report["decode_nvme_read_bytes_per_token"] > 0
    # A redone step counts once: as many steps (and selected pages) as without NVMe.
    assert report["decode_steps"] == host_report["decode_steps"] == len(want) - 1
    assert report["selected_pages"] == host_report["selected_pages"]
    for key in ("late_pages", "skipped_pages", "redone_steps", "nvme_wait_ms_per_token"):
        assert host_report[key] == 0, key


def test_zero_wait_bound_skips_late_pages(tmp_path, host_only_run):
    """LCRUN_NVME_WAIT_MS=0: no step waits or runs again; its late pages are counted as skipped,
    and skipping them changes the answer (the test above is not trivially true)."""
    want, _ = host_only_run
    got, report = _decode_run(tmp_path, 40, wait_s=0.0)
    assert report["late_pages"] > 0
    assert report["skipped_pages"] == report["late_pages"] == report["unreadable_selected_pages"]
    assert report["redone_steps"] == 0 and report["nvme_wait_ms_per_token"] == 0
    assert got != want


def test_wait_bound_reached_on_a_slow_disk(tmp_path, monkeypatch):
    """A promoter read that outlasts the wait bound: the step keeps its result and its late pages
    count as skipped after waiting about the bound."""
    from lcrun.offload import nvme_store
    slow = nvme_store.NvmeStore.read_into_sync

    def read_into_sync(self, slot_ids, dst):
        time.sleep(0.15)
        return slow(self, slot_ids, dst)
    monkeypatch.setattr(nvme_store.NvmeStore, "read_into_sync", read_into_sync)
    _, report = _decode_run(tmp_path, 40, n=6, wait_s=0.01)
    assert report["skipped_pages"] > 0 and report["late_pages"] >= report["skipped_pages"]
    assert report["nvme_wait_ms_per_token"] * report["decode_steps"] >= 10  # the first step waited the bound


def test_wait_bound_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LCRUN_NVME_WAIT_MS", "50")
    monkeypatch.setenv("LCRUN_NVME_MAX_REDOS", "1")
    cache = _tiered(512, tmp_path, 40)
    assert (cache.settler.wait_s, cache.settler.max_redos) == (0.05, 1)
    cache.close()
    monkeypatch.setenv("LCRUN_NVME_WAIT_MS", "soon")
    with pytest.raises(ConfigError, match="LCRUN_NVME_WAIT_MS"):
        _tiered(512, tmp_path, 40)


def test_promotion_reads_keep_many_requests_in_flight(tmp_path, monkeypatch):
    """Scattered pages (one read call each) are dealt out to every I/O thread even when the batch
    is small, so a disk sees up to io_threads requests at once; consecutive ones stay one call."""
    from lcrun.offload import nvme_store
    with nvme_store.NvmeStore(tmp_path, 4096, 512, io_threads=16) as store:
        data = torch.randint(0, 255, (512, 4096), dtype=torch.uint8)
        store.write(range(512), data)
        assert len(store._plan([(s, None) for s in range(64)])) == 1  # 256 KiB in a row: one call
        scattered = list(range(0, 512, 8))                             # 64 pages, none adjacent
        assert len(store._plan([(s, None) for s in scattered])) == 16
        real, lock, state = os.preadv, threading.Lock(), {"now": 0, "most": 0}

        def preadv(fd, buffers, offset):
            with lock:
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
            time.sleep(0.005)  # a disk's latency: the calls overlap only if they are issued together
            try:
                return real(fd, buffers, offset)
            finally:
                with lock:
                    state["now"] -= 1
        monkeypatch.setattr(nvme_store.os, "preadv", preadv)
        dst = torch.empty((len(scattered), 4096), dtype=torch.uint8)
        store.read_into_sync(scattered[::-1], dst)
        assert torch.equal(dst, data[scattered[::-1]])
        assert state["most"] >= 8


def test_io_threads_from_the_environment(tmp_path, monkeypatch):
    from lcrun.errors import LcrunError
    from lcrun.offload import nvme_store
    monkeypatch.setenv("LCRUN_NVME_IO_THREADS", "5")
    with nvme_store.NvmeStore(tmp_path, 4096, 8) as store:
        assert store.io_threads == 5
    monkeypatch.setenv("LCRUN_NVME_IO_THREADS", "0")
    with pytest.raises(LcrunError, match="LCRUN_NVME_IO_THREADS"):
        nvme_store.NvmeStore(tmp_path, 4096, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replayed_decode_with_nvme_equals_host_only_on_gpu(tmp_path):
    """The CUDA-graph path: a replayed step that read late pages is replayed again."""
    want, host_report = _decode_run(tmp_path, None, device="cuda")
    got, report = _decode_run(tmp_path, 40, device="cuda")
    assert got == want and report["cuda_graph"]
    assert report["late_pages"] > 0 and report["redone_steps"] > 0 and report["skipped_pages"] == 0
    assert report["decode_steps"] == host_report["decode_steps"]
