"""Tiered KV store kernels (host pool + direct-mapped GPU page cache) against their torch references.

Without CUDA the Triton kernels run in the interpreter on CPU tensors (TRITON_INTERPRET is set
before the kernel modules are imported). With CUDA the same tests run the compiled kernels, with
host_kv in pinned host memory read and written in place (zero-copy); the ``gpu`` test also uses a
real ``HostPagePool`` (cudaHostRegister) and a CUDA graph. A decode step admits its selection
(admit_pages with a read map) and attends over the GPU pool with sparse_decode_attention: the
admission tests check what attention then reads.
"""

import functools

import pytest
import torch

from lcrun.kernels import tiered_reference as ref  # noqa: E402

from triton_env import DEVICE, require_triton  # noqa: E402

require_triton()

from lcrun.kernels.sparse_decode import sparse_decode_attention  # noqa: E402
from lcrun.kernels import reference  # noqa: E402
from lcrun.kernels.tiered import (HostPointer, admit_pages, as_kernel_pointer, gather_pages_to_staging,  # noqa: E402
                                  write_through)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: 1e-5, F16: 2e-3, BF16: 1.5e-2}  # ||out - ref|| / ||ref||
gpu = pytest.mark.gpu


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    out, expected = out.double(), expected.double()
    return ((out - expected).norm() / expected.norm()).item()


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern (NaN-safe, exact comparisons)."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()]) if t.is_floating_point() else t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(bits(a.cpu()), bits(b.cpu()))


def same_result(out: torch.Tensor, expected: torch.Tensor, dtype) -> bool:
    """Two kernels doing the same arithmetic: bit-exact in the interpreter; compiled, allow a last-bit
    difference should code generation differ between the two kernels."""
    return torch.equal(out, expected) if DEVICE.type == "cpu" else rel_err(out, expected) < TOL[dtype]


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Host pool memory: pinned CPU memory when a GPU reads it, plain CPU tensors in the interpreter."""
    return t.pin_memory() if DEVICE.type == "cuda" else t


def i32(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int32, device=DEVICE)


class Store:
    """One layer of a tiered store with known content: ``true_k/v[h, p]`` is logical page (h, p).

    Host slots are a random permutation (spare slots hold junk); a ``spill`` fraction of pages is
    not in the host pool (host_slot -1); the cache has few slots (direct-mapped conflicts) and each
    slot holds, with probability ``cache_frac``, a correct copy of one page mapping to it (possibly
    a spilled one), else junk with tag -1.
    """

    def __init__(self, hkv, max_pages, P, d, dtype, num_cache_slots=5, spill=0.2, cache_frac=0.7, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.hkv, self.max_pages, self.P, self.d, self.dtype = hkv, max_pages, P, d, dtype
        n_pages = hkv * max_pages
        self.true_k = torch.randn(hkv, max_pages, P, d, generator=gen).to(dtype)
        self.true_v = torch.randn(hkv, max_pages, P, d, generator=gen).to(dtype)
        num_host = n_pages + 4
        host_kv = torch.randn(num_host, 2, P, d, generator=gen).to(dtype)  # junk in unused slots
        host_slot = torch.randperm(num_host, generator=gen)[:n_pages].reshape(hkv, max_pages)
        host_kv[host_slot, 0] = self.true_k
        host_kv[host_slot, 1] = self.true_v
        self.home = host_slot.to(torch.int32).to(DEVICE)  # host slots before spilling (all distinct)
        host_slot[torch.rand(hkv, max_pages, generator=gen) < spill] = -1
        cache_slot = torch.randint(0, num_cache_slots, (hkv, max_pages), generator=gen)
        gpu_k = torch.randn(num_cache_slots, P, d, generator=gen).to(dtype)
        gpu_v = torch.randn(num_cache_slots, P, d, generator=gen).to(dtype)
        tag = torch.full((num_cache_slots,), -1, dtype=torch.int32)
        for s in range(num_cache_slots):
            claimants = (cache_slot.flatten() == s).nonzero().flatten()
            if len(claimants) and torch.rand(1, generator=gen).item() < cache_frac:
                flat = int(claimants[torch.randint(len(claimants), (1,), generator=gen)])
                h, p = divmod(flat, max_pages)
                tag[s], gpu_k[s], gpu_v[s] = flat, self.true_k[h, p], self.true_v[h, p]
        self.gen = gen
        self.host_kv = to_host(host_kv)
        self.host_slot = host_slot.to(torch.int32).to(DEVICE)
        self.cache_slot = cache_slot.to(torch.int32).to(DEVICE)
        self.gpu_k, self.gpu_v, self.tag = gpu_k.to(DEVICE), gpu_v.to(DEVICE), tag.to(DEVICE)

    def cached(self) -> torch.Tensor:
        """(Hkv, max_pages) bool on the CPU."""
        flat = torch.arange(self.hkv * self.max_pages).reshape(self.hkv, self.max_pages)
        return self.tag.cpu()[self.cache_slot.cpu().long()] == flat

    def select(self, kmax, full_frac=0.6):
        """Distinct random pages per head; lengths a mix of full, partial (not multiples of P), 0."""
        pages = torch.stack([torch.randperm(self.max_pages, generator=self.gen)[:kmax] for _ in range(self.hkv)])
        lens = torch.randint(1, self.P, (self.hkv, kmax), generator=self.gen)
        lens[torch.rand(self.hkv, kmax, generator=self.gen) < full_frac] = self.P
        lens[torch.rand(self.hkv, kmax, generator=self.gen) < 0.15] = 0
        return pages.to(torch.int32).to(DEVICE), lens.to(torch.int32).to(DEVICE)

    def flat_pool(self):
        """The true pages as one pool for ``sparse_decode_attention``: (h, p) in slot h * max_pages + p."""
        shape = (self.hkv * self.max_pages, self.P, self.d)
        return self.true_k.reshape(shape).to(DEVICE), self.true_v.reshape(shape).to(DEVICE)


def true_selection(store, sel_pages, sel_lens):
    """The selection as slots of ``store.flat_pool()`` ((h, p) in slot h * max_pages + p), with
    length 0 for entries whose page is in no readable tier (neither cached nor in the host pool)."""
    heads = torch.arange(store.hkv, device=DEVICE, dtype=torch.int32)[:, None]
    pages = sel_pages.cpu().long()
    h = torch.arange(store.hkv)[:, None].expand_as(pages)
    readable = store.cached()[h, pages] | (store.host_slot.cpu()[h, pages] >= 0)
    return (heads * store.max_pages + sel_pages).contiguous(), torch.where(readable.to(DEVICE), sel_lens, 0)


def admit_with_read_map(store, sel_pages, sel_lens, fn=admit_pages, tag=None, gpu_k=None, gpu_v=None,
                        host_slot=None):
    """Demand admission with a read map into a copy of the cache (``store``'s unless given) whose
    overflow slots (one per entry, after the cache slots) are poisoned with NaN.
    Returns (tag, pool_k, pool_v, read_slot, read_lens)."""
    tag = (store.tag if tag is None else tag).clone()
    gpu_k = store.gpu_k if gpu_k is None else gpu_k
    gpu_v = store.gpu_v if gpu_v is None else gpu_v
    extra = torch.full((sel_pages.numel(), store.P, store.d), float("nan"), dtype=gpu_k.dtype, device=DEVICE)
    pool_k, pool_v = torch.cat([gpu_k, extra]), torch.cat([gpu_v, extra])
    read_slot, read_lens = torch.full_like(sel_pages, -7), torch.full_like(sel_lens, -7)
    fn(sel_pages, sel_lens, store.cache_slot, tag, store.host_slot if host_slot is None else host_slot,
       store.host_kv, pool_k, pool_v, read_slot=read_slot, read_lens=read_lens, overflow=gpu_k.shape[0])
    return tag, pool_k, pool_v, read_slot, read_lens


def test_as_kernel_pointer():
    t = torch.randn(4, 8)
    assert as_kernel_pointer(t, torch.device("cpu")) is t
    p = as_kernel_pointer(t, torch.device("cuda"))
    assert isinstance(p, HostPointer) and p.data_ptr() == t.data_ptr() and p.dtype == t.dtype and p.tensor is t


# -- admit_pages -----------------------------------------------------------------------------------

def run_admit(store, sel_pages, sel_lens, fn=admit_pages):
    tag, gpu_k, gpu_v = store.tag.clone(), store.gpu_k.clone(), store.gpu_v.clone()
    fn(sel_pages, sel_lens, store.cache_slot, tag, store.host_slot, store.host_kv, gpu_k, gpu_v)
    return tag, gpu_k, gpu_v


@pytest.mark.parametrize("hkv,d,P,dtype,slots,seed", [
    (2, 64, 16, F32, 5, 0), (4, 128, 32, F16, 6, 1), (3, 64, 32, BF16, 4, 2), (8, 64, 16, F16, 9, 3),
])
def test_admit_pages(hkv, d, P, dtype, slots, seed):
    store = Store(hkv=hkv, max_pages=10, P=P, d=d, dtype=dtype, num_cache_slots=slots, seed=seed, cache_frac=0.5)
    sel_pages, sel_lens = store.select(kmax=6)
    store.gpu_k[store.tag < 0] = float("nan")  # empty slots poisoned
    tag, gpu_k, gpu_v = run_admit(store, sel_pages, sel_lens)
    ref_tag, ref_k, ref_v = run_admit(store, sel_pages, sel_lens, ref.admit_pages)
    assert torch.equal(tag, ref_tag) and same_bits(gpu_k, ref_k) and same_bits(gpu_v, ref_v)

    old_tag = store.tag.cpu()
    tag, gpu_k, gpu_v = tag.cpu(), gpu_k.cpu(), gpu_v.cpu()
    changed = (tag != old_tag).nonzero().flatten().tolist()
    assert changed, "nothing admitted: weak test"
    hs, cs = store.host_slot.cpu(), store.cache_slot.cpu()
    host_kv = store.host_kv.cpu()
    sp, sl, kmax = sel_pages.cpu(), sel_lens.cpu(), sel_pages.shape[1]
    sel = {(h, int(p)) for h in range(hkv) for p, n in zip(sp[h].tolist(), sl[h].tolist()) if n}
    was_cached = store.cached()
    for s in range(slots):
        if s in changed:  # an admitted page: selected, was uncached and host-resident, now bit-exact
            h, p = divmod(int(tag[s]), store.max_pages)
            assert (h, p) in sel and not was_cached[h, p] and hs[h, p] >= 0 and cs[h, p] == s
            assert same_bits(gpu_k[s], host_kv[hs[h, p], 0]) and same_bits(gpu_v[s], host_kv[hs[h, p], 1])
            claimants = sorted(h2 * kmax + e for h2 in range(hkv) for e in range(kmax)
                               if sl[h2, e] and cs[h2, sp[h2, e]] == s and hs[h2, sp[h2, e]] >= 0)
            assert (h, p) == (claimants[0] // kmax, int(sp.view(-1)[claimants[0]]))  # smallest flat index
        else:  # untouched, bit for bit (incumbents, slots nobody claimed, slots of lost conflicts)
            assert same_bits(gpu_k[s], store.gpu_k[s]) and same_bits(gpu_v[s], store.gpu_v[s])
    for h, p in sel:  # a selected page stays uncached only if not in the host pool or it lost its slot
        if tag[cs[h, p]] != h * store.max_pages + p:
            assert hs[h, p] < 0 or divmod(int(tag[cs[h, p]]), store.max_pages) in sel


def test_admit_conflicts():
    """Direct-mapped conflicts: one writer per slot, smallest flat entry index wins; a selected
    incumbent keeps its slot; spilled pages are not admitted; partial pages copied whole."""
    hkv, max_pages, P, d = 2, 6, 16, 64
    store = Store(hkv=hkv, max_pages=max_pages, P=P, d=d, dtype=F16, num_cache_slots=4, spill=0.0, cache_frac=0.0)
    cs = torch.tensor([[0, 1, 2, 3, 1, 2], [2, 3, 0, 1, 3, 0]], dtype=torch.int32)
    hs = store.host_slot.cpu()
    hs[0, 5] = -1
    store.cache_slot, store.host_slot = cs.to(DEVICE), hs.to(DEVICE)
    # Slot 1 holds page (1, 3), selected below: it stays. Slot 3 holds page (0, 3), not selected.
    store.tag = torch.tensor([-1, 1 * max_pages + 3, -1, 3], dtype=torch.int32, device=DEVICE)
    store.gpu_k[1], store.gpu_v[1] = store.true_k[1, 3], store.true_v[1, 3]
    store.gpu_k[3], store.gpu_v[3] = store.true_k[0, 3], store.true_v[0, 3]
    # Entries (flat h * kmax + e): 0:(0,2)->slot 2  1:(0,4)->slot 1  2:(0,5)->slot 2 spilled
    #                              3:(1,0)->slot 2  4:(1,3)->slot 1 incumbent  5:(1,4)->slot 3, len 5
    sel_pages = torch.tensor([[2, 4, 5], [0, 3, 4]], dtype=torch.int32, device=DEVICE)
    sel_lens = torch.tensor([[P, P, P], [P, 7, 5]], dtype=torch.int32, device=DEVICE)
    for fn in (admit_pages, ref.admit_pages):
        tag, gpu_k, gpu_v = run_admit(store, sel_pages, sel_lens, fn)
        assert tag.tolist() == [-1, 1 * max_pages + 3, 0 * max_pages + 2, 1 * max_pages + 4], fn
        assert same_bits(gpu_k[2], store.true_k[0, 2]) and same_bits(gpu_v[2], store.true_v[0, 2])
        assert same_bits(gpu_k[3], store.true_k[1, 4]) and same_bits(gpu_v[3], store.true_v[1, 4])
        for s in (0, 1):
            assert same_bits(gpu_k[s], store.gpu_k[s]) and same_bits(gpu_v[s], store.gpu_v[s])
    # Once admitted, a second call is a no-op (everything selected and readable is cached or lost).
    store.tag, store.gpu_k, store.gpu_v = tag, gpu_k, gpu_v
    again = run_admit(store, sel_pages, sel_lens)
    assert torch.equal(again[0], tag) and same_bits(again[1], gpu_k) and same_bits(again[2], gpu_v)


def test_admit_distinct_slots_without_the_conflict_scan():
    """``distinct=True`` (the caller picked one page per slot, as GpuPageCache.fill does over a
    whole layer) admits exactly what the scanning call and the reference admit."""
    store = Store(hkv=3, max_pages=12, P=16, d=64, dtype=BF16, num_cache_slots=7, spill=0.25, cache_frac=0.5, seed=4)
    pages = torch.arange(12, dtype=torch.int32, device=DEVICE).expand(3, -1).contiguous()
    flat = torch.arange(3 * 12).view(3, 12)
    first = torch.full((7,), 10 ** 6, dtype=torch.long).scatter_reduce(
        0, store.cache_slot.cpu().flatten().long(), flat.flatten(), "amin")
    one_per_slot = first[store.cache_slot.cpu().long()] == flat       # the lowest page id of each slot
    lens = torch.where(one_per_slot, 16, 0).to(torch.int32).to(DEVICE)
    got = [run_admit(store, pages, lens, functools.partial(admit_pages, distinct=True)),
           run_admit(store, pages, lens), run_admit(store, pages, lens, ref.admit_pages)]
    for tag, gpu_k, gpu_v in got[1:]:
        assert torch.equal(got[0][0], tag) and same_bits(got[0][1], gpu_k) and same_bits(got[0][2], gpu_v)
    assert not torch.equal(got[0][0], store.tag), "nothing admitted: weak test"


def test_admit_counts_hits_and_marks_prefetch():
    """Demand calls count [selected, cached, unreadable, cached by this step's prefetch] as found
    before admitting; a speculative call marks the slots it fills with the step and counts them."""
    hkv, max_pages, P, d = 4, 12, 16, 64
    store = Store(hkv=hkv, max_pages=max_pages, P=P, d=d, dtype=F16, num_cache_slots=40, seed=5, cache_frac=0.4,
                  spill=0.2)
    sel_pages, sel_lens = store.select(kmax=5)
    step = i32(7)
    results = []
    for fn in (admit_pages, ref.admit_pages):
        tag = store.tag.clone()
        gpu_k, gpu_v = store.gpu_k.clone(), store.gpu_v.clone()
        counters = torch.zeros(5, dtype=torch.int64, device=DEVICE)
        spec_mark = torch.full_like(tag, -1)
        args = (store.cache_slot, tag, store.host_slot, store.host_kv, gpu_k, gpu_v, counters, spec_mark, step)
        fn(sel_pages, sel_lens, *args, speculative=True)  # prefetch: counts only what it admits
        after_spec = counters.clone()
        spec_slots = (spec_mark == 7).nonzero().flatten()
        fn(sel_pages, sel_lens, *args)  # the same selection on demand: every admitted page is a hit
        results.append((after_spec.cpu(), counters.cpu(), spec_mark.cpu(), tag.cpu()))
        # expected from first principles
        used, cached = sel_lens.cpu() > 0, store.cached()
        sp, hs, cs = sel_pages.cpu().long(), store.host_slot.cpu(), store.cache_slot.cpu()
        flat_cached = torch.zeros_like(used)
        for h in range(hkv):
            for e in range(sp.shape[1]):
                if used[h, e]:
                    flat_cached[h, e] = int(tag[cs[h, sp[h, e]]]) == h * max_pages + int(sp[h, e])
        unreadable = used & ~flat_cached & (hs.gather(1, sp) < 0)
        assert after_spec.tolist() == [0, 0, 0, 0, spec_slots.numel()]
        assert spec_slots.numel() > 0 and spec_slots.numel() == int((tag != store.tag).sum())
        assert counters.tolist() == [int(used.sum()), int(flat_cached.sum()), int(unreadable.sum()),
                                     spec_slots.numel(), spec_slots.numel()]
        assert int(flat_cached.sum()) > int((used & cached.gather(1, sp)).sum())
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1]))


@pytest.mark.parametrize("hkv,d,P,dtype,slots,seed", [(2, 64, 16, F32, 5, 0), (4, 128, 32, F16, 6, 1),
                                                     (8, 64, 16, F32, 9, 3)])
def test_admit_read_map_puts_every_readable_page_in_gpu_memory(hkv, d, P, dtype, slots, seed):
    """With a read map, every readable selected page ends up in GPU memory, bit for bit: in its
    cache slot (cached before, or admitted now), or in the entry's overflow slot when another page
    holds that slot; unused entries and pages in no readable tier get length 0. Attention over
    (read_slot, read_lens) in the pool is attention over the readable true pages. Kernel and
    reference agree."""
    store = Store(hkv=hkv, max_pages=10, P=P, d=d, dtype=dtype, num_cache_slots=slots, seed=seed, cache_frac=0.5,
                  spill=0.2)
    sel_pages, sel_lens = store.select(kmax=6)
    kmax = sel_pages.shape[1]
    q = torch.randn(hkv * 3, d, generator=store.gen).to(dtype).to(DEVICE)
    sel_slots, lens = true_selection(store, sel_pages, sel_lens)
    assert int((lens != sel_lens).sum()) > 0, "no unreadable entry: weak test"
    want = reference.sparse_decode_attention(q, *store.flat_pool(), sel_slots, lens)
    cs, sp = store.cache_slot.cpu(), sel_pages.cpu()
    results = []
    for fn in (admit_pages, ref.admit_pages):
        tag, pool_k, pool_v, read_slot, read_lens = admit_with_read_map(store, sel_pages, sel_lens, fn)
        results.append((tag, read_slot, read_lens, pool_k, pool_v))
        assert torch.equal(read_lens, lens)
        rs, tg, pk, pv = read_slot.cpu(), tag.cpu(), pool_k.cpu(), pool_v.cpu()
        for h, e in (lens.cpu() > 0).nonzero().tolist():
            p, s, flat = int(sp[h, e]), int(rs[h, e]), h * store.max_pages + int(sp[h, e])
            assert same_bits(pk[s], store.true_k[h, p]) and same_bits(pv[s], store.true_v[h, p])
            if s < slots:   # cached in its own slot now
                assert s == cs[h, p] and tg[s] == flat
            else:           # lost its slot to another selected page: the entry's overflow slot
                assert s == slots + h * kmax + e and tg[cs[h, p]] != flat
        got = reference.sparse_decode_attention(q, pool_k, pool_v, read_slot, read_lens)
        assert rel_err(got, want) < TOL[dtype]
        assert int((read_slot >= slots).sum()) > 0 or slots > 8  # conflicts exercised in the small caches
    for a, b in zip(*results):
        assert same_bits(a, b)


@pytest.mark.parametrize("g,d,P,dtype", [(4, 64, 16, F32), (3, 128, 32, F16), (8, 64, 16, BF16)])
def test_caching_never_changes_the_result(g, d, P, dtype):
    """With every selected page readable, admission then sparse_decode_attention over the pool
    gives attention over the true pages (bit for bit, same splits), whatever the cache held: as
    built, nothing (a poisoned cache), or every selected page already admitted."""
    store = Store(hkv=3, max_pages=10, P=P, d=d, dtype=dtype, num_cache_slots=6, spill=0.0, seed=d + g)
    sel_pages, sel_lens = store.select(kmax=7)
    q = torch.randn(store.hkv * g, d, generator=store.gen).to(dtype).to(DEVICE)
    sel_slots, _ = true_selection(store, sel_pages, sel_lens)
    expected = sparse_decode_attention(q, *store.flat_pool(), sel_slots, sel_lens, num_splits=2)
    poisoned = torch.full_like(store.gpu_k, float("nan"))
    admitted = run_admit(store, sel_pages, sel_lens, ref.admit_pages)
    assert not torch.equal(admitted[0], store.tag)
    results = []
    for tag, k, v in [(store.tag, store.gpu_k, store.gpu_v), (torch.full_like(store.tag, -1), poisoned, poisoned),
                      admitted]:
        _, pool_k, pool_v, read_slot, read_lens = admit_with_read_map(store, sel_pages, sel_lens, tag=tag, gpu_k=k,
                                                                      gpu_v=v)
        assert torch.equal(read_lens, sel_lens)  # every selected page is read
        out = torch.full_like(q, float("nan"))
        sparse_decode_attention(q, pool_k, pool_v, read_slot, read_lens, num_splits=2, out=out)
        results.append(out)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert same_result(results[0], expected, dtype)


def test_pages_out_of_both_tiers_are_read_as_empty():
    """An entry whose page is neither cached nor in the host pool gets length 0 in the read map; a
    spilled page still cached is read from its cache slot. A KV head with nothing readable
    attends to nothing: zeros."""
    g, d, P, dtype = 4, 64, 16, F16
    store = Store(hkv=2, max_pages=12, P=P, d=d, dtype=dtype, spill=0.4, num_cache_slots=7, seed=5)
    sel_pages, sel_lens = store.select(kmax=9, full_frac=1.0)
    hs, cached, pages = store.host_slot.cpu(), store.cached(), sel_pages.cpu().long()
    heads = torch.arange(store.hkv)[:, None].expand_as(pages)
    used = sel_lens.cpu() > 0
    unreadable = (hs[heads, pages] < 0) & ~cached[heads, pages] & used
    spilled_cached = (hs[heads, pages] < 0) & cached[heads, pages] & used
    assert unreadable.any() and spilled_cached.any(), "seed must give both cases"
    _, pool_k, pool_v, read_slot, read_lens = admit_with_read_map(store, sel_pages, sel_lens)
    assert torch.equal(read_lens.cpu(), torch.where(unreadable, 0, sel_lens.cpu()))
    cslot = store.cache_slot.cpu()[heads, pages]
    assert torch.equal(read_slot.cpu()[spilled_cached], cslot[spilled_cached])
    q = torch.randn(store.hkv * g, d, generator=store.gen).to(dtype).to(DEVICE)
    out = sparse_decode_attention(q, pool_k, pool_v, read_slot, read_lens, num_splits=2)
    sel_slots, lens = true_selection(store, sel_pages, sel_lens)
    assert same_result(out, sparse_decode_attention(q, *store.flat_pool(), sel_slots, lens, num_splits=2), dtype)
    # Nothing cached and nothing in the host pool: every entry is empty, and attention gives zeros.
    _, pool_k, pool_v, read_slot, read_lens = admit_with_read_map(
        store, sel_pages, sel_lens, tag=torch.full_like(store.tag, -1), host_slot=torch.full_like(store.host_slot, -1))
    assert not read_lens.any()
    out = torch.full_like(q, float("nan"))
    sparse_decode_attention(q, pool_k, pool_v, read_slot, read_lens, out=out)
    assert torch.equal(out, torch.zeros_like(out))


# -- write_through ---------------------------------------------------------------------------------

@pytest.mark.parametrize("T,start,device_start,P,d,dtype", [
    (1, 37, True, 16, 64, F16), (5, 14, False, 16, 128, F32), (45, 3, True, 32, 64, BF16),
    (70, 0, False, 16, 64, F16), (1, 0, False, 32, 128, F32), (33, 64, True, 32, 128, F16),
])
def test_write_through(T, start, device_start, P, d, dtype):
    hkv, max_pages = 3, -(-(start + T) // P) + 2
    store = Store(hkv=hkv, max_pages=max_pages, P=P, d=d, dtype=dtype, num_cache_slots=5, spill=0.3,
                  seed=T + start, cache_frac=0.9)
    hs, home = store.host_slot.cpu(), store.home.cpu()
    written = list(range(start // P, (start + T - 1) // P + 1))
    hs[:, written] = home[:, written]  # the caller guarantees host slots for the pages being written
    store.host_slot = hs.to(DEVICE)
    # Page (0, first) cached; page (1, first) not (its slot's tag names another page or none).
    p = written[0]
    cs = store.cache_slot.cpu()
    store.tag[cs[1, p]] = -1
    store.tag[cs[0, p]] = p
    store.gpu_k[cs[0, p]], store.gpu_v[cs[0, p]] = store.true_k[0, p].to(DEVICE), store.true_v[0, p].to(DEVICE)
    assert store.cached()[0, p] and not store.cached()[1, p]
    k_new = torch.randn(T, hkv, d, generator=store.gen).to(dtype).to(DEVICE)
    v_new = torch.randn(T, hkv, d, generator=store.gen).to(dtype).to(DEVICE)
    start_arg = torch.tensor([start], device=DEVICE) if device_start else start  # int64 tensor
    results = []
    for fn in (write_through, ref.write_through):
        host_kv, gpu_k, gpu_v = to_host(store.host_kv.clone()), store.gpu_k.clone(), store.gpu_v.clone()
        fn(k_new, v_new, start_arg, host_kv, store.host_slot, gpu_k, gpu_v, store.cache_slot, store.tag)
        results.append((host_kv, gpu_k, gpu_v))
    (host_kv, gpu_k, gpu_v), expected = results
    for a, b in zip(results[0], expected):
        assert same_bits(a, b)
    # Direct checks: every token at its page's host slot and offset; cached copies updated; the
    # rest of the host pool and every other cache row bit-exact.
    host_kv, gpu_k, gpu_v = host_kv.cpu(), gpu_k.cpu(), gpu_v.cpu()
    want_host, want_k, want_v = store.host_kv.cpu().clone(), store.gpu_k.cpu().clone(), store.gpu_v.cpu().clone()
    cached, cs, kc, vc = store.cached(), store.cache_slot.cpu(), k_new.cpu(), v_new.cpu()
    for t in range(T):
        p, off = divmod(start + t, P)
        for h in range(hkv):
            want_host[hs[h, p], 0, off], want_host[hs[h, p], 1, off] = kc[t, h], vc[t, h]
            if cached[h, p]:
                want_k[cs[h, p], off], want_v[cs[h, p], off] = kc[t, h], vc[t, h]
    assert same_bits(host_kv, want_host) and same_bits(gpu_k, want_k) and same_bits(gpu_v, want_v)


@pytest.mark.parametrize("start,P,d,dtype", [(37, 16, 64, F16), (32, 32, 128, BF16), (0, 16, 64, F32),
                                           (63, 32, 128, F32)])
def test_write_through_running_abstracts(start, P, d, dtype):
    """A decode token's page gets its running min/max in the write-through launch: restarted at
    the page's first token, folded in otherwise; other pages untouched."""
    hkv, max_pages = 3, start // P + 3
    store = Store(hkv=hkv, max_pages=max_pages, P=P, d=d, dtype=dtype, num_cache_slots=5, spill=0.0, seed=start)
    k_new = torch.randn(1, hkv, d, generator=store.gen).to(dtype).to(DEVICE)
    v_new = torch.randn(1, hkv, d, generator=store.gen).to(dtype).to(DEVICE)
    kmin0 = torch.randn(hkv, max_pages, d, generator=store.gen).to(dtype).to(DEVICE)
    kmax0 = kmin0 + 1
    results = []
    for fn in (write_through, ref.write_through):
        kmin, kmax = kmin0.clone(), kmax0.clone()
        fn(k_new, v_new, i32(start), to_host(store.host_kv.clone()), store.host_slot, store.gpu_k.clone(),
           store.gpu_v.clone(), store.cache_slot, store.tag, kmin, kmax)
        results.append((kmin.cpu(), kmax.cpu()))
    page, fresh = start // P, start % P == 0
    want_min, want_max = kmin0.cpu().clone(), kmax0.cpu().clone()
    k = k_new.cpu()[0]
    want_min[:, page] = k if fresh else torch.minimum(want_min[:, page], k)
    want_max[:, page] = k if fresh else torch.maximum(want_max[:, page], k)
    for kmin, kmax in results:
        assert same_bits(kmin, want_min) and same_bits(kmax, want_max)


# -- gather_pages_to_staging -----------------------------------------------------------------------

@pytest.mark.parametrize("hkv,P,d,dtype,num_pages", [
    (2, 16, 64, F16, 7), (3, 32, 128, BF16, 5), (2, 16, 128, F32, 9), (1, 32, 64, F16, 1), (2, 16, 64, F32, 0),
])
def test_gather_pages_to_staging(hkv, P, d, dtype, num_pages):
    store = Store(hkv=hkv, max_pages=10, P=P, d=d, dtype=dtype, spill=0.0, seed=num_pages)
    capacity = num_pages * P + 3 * P + 5
    results = []
    for fn in (gather_pages_to_staging, ref.gather_pages_to_staging):
        staging_k = torch.full((hkv, capacity, d), float("nan"), dtype=dtype, device=DEVICE)
        staging_v = torch.full_like(staging_k, float("nan"))
        fn(store.host_kv, store.host_slot, num_pages, staging_k, staging_v)
        results.append((staging_k.cpu(), staging_v.cpu()))
    (staging_k, staging_v), expected = results
    assert same_bits(staging_k, expected[0]) and same_bits(staging_v, expected[1])
    n = num_pages * P
    assert same_bits(staging_k[:, :n], store.true_k[:, :num_pages].reshape(hkv, n, d))
    assert same_bits(staging_v[:, :n], store.true_v[:, :num_pages].reshape(hkv, n, d))
    assert staging_k[:, n:].isnan().all() and staging_v[:, n:].isnan().all()


# -- fp8 pages -------------------------------------------------------------------------------------

FP8 = torch.float8_e4m3fn


def fp8_store(hkv, max_pages, P, d, seed, num_cache_slots=5, spill=0.0):
    """A Store whose pages are e4m3 codes with per-head power-of-two scales; true_k/v hold what the
    codes mean (code * scale, in fp32), kv_scale the (Hkv, 4) scales of lcrun.kernels.tiered."""
    from lcrun.runtime.tiered import fp8_scales
    store = Store(hkv=hkv, max_pages=max_pages, P=P, d=d, dtype=F32, num_cache_slots=num_cache_slots, spill=spill,
                  seed=seed)
    # Heads of very different magnitudes: one scale per head has to serve each.
    mag = torch.tensor([0.02, 1.0, 30.0, 0.5][:hkv]).view(hkv, 1, 1, 1)
    amax = torch.stack(((store.true_k * mag).abs().amax((1, 2, 3)), (store.true_v * mag).abs().amax((1, 2, 3))), -1)
    scale = fp8_scales(amax)
    ks, vs = scale[:, 0].view(hkv, 1, 1, 1), scale[:, 1].view(hkv, 1, 1, 1)
    codes_k = ref.encode(store.true_k * mag, 1 / ks, FP8)
    codes_v = ref.encode(store.true_v * mag, 1 / vs, FP8)
    store.true_k, store.true_v = codes_k.float() * ks, codes_v.float() * vs
    host = store.host_kv.cpu().to(FP8)  # junk slots stay junk codes
    home = store.home.cpu().long()
    host[home, 0], host[home, 1] = codes_k, codes_v
    store.host_kv = to_host(host)
    cached = store.cached()
    gk, gv = store.gpu_k.cpu().to(FP8), store.gpu_v.cpu().to(FP8)
    for h, p in cached.nonzero().tolist():
        slot = int(store.cache_slot[h, p])
        gk[slot], gv[slot] = codes_k[h, p], codes_v[h, p]
    store.gpu_k, store.gpu_v = gk.to(DEVICE), gv.to(DEVICE)
    store.dtype, store.kv_scale, store.codes = FP8, scale.to(DEVICE), (codes_k, codes_v)
    return store, mag


@pytest.mark.parametrize("T,start,P,d,dtype", [(1, 37, 16, 64, F16), (45, 3, 32, 128, BF16), (70, 0, 16, 64, F32)])
def test_fp8_write_through_stores_codes_and_exact_abstracts(T, start, P, d, dtype):
    """Tokens land as e4m3 codes of value / scale (their head's scale; kernel = reference, bit for
    bit), in the host page and the cached copy; code * scale is within e4m3's rounding of the
    value; the running abstracts stay exact."""
    hkv, max_pages = 3, -(-(start + T) // P) + 2
    store, mag = fp8_store(hkv, max_pages, P, d, seed=T)
    mag = mag.view(1, hkv, 1).to(DEVICE)
    k_new = (torch.randn(T, hkv, d, generator=store.gen).to(DEVICE) * mag).to(dtype)
    v_new = (torch.randn(T, hkv, d, generator=store.gen).to(DEVICE) * mag).to(dtype)
    abstracts = T == 1
    results = []
    for fn in (write_through, ref.write_through):
        host_kv, gpu_k, gpu_v = to_host(store.host_kv.clone()), store.gpu_k.clone(), store.gpu_v.clone()
        kmin = torch.zeros(hkv, max_pages, d, dtype=dtype, device=DEVICE) if abstracts else None
        kmax = torch.zeros_like(kmin) if abstracts else None
        fn(k_new, v_new, i32(start), host_kv, store.host_slot, gpu_k, gpu_v, store.cache_slot, store.tag, kmin, kmax,
           kv_scale=store.kv_scale)
        results.append((host_kv, gpu_k, gpu_v) + ((kmin, kmax) if abstracts else ()))
    for a, b in zip(*results):
        assert same_bits(a, b)
    host_kv = results[0][0].cpu()
    scale = store.kv_scale.cpu()
    for t in (0, T - 1):
        p, off = divmod(start + t, P)
        for h in range(hkv):
            slot = int(store.host_slot[h, p])
            for kv, new in ((0, k_new), (1, v_new)):
                value = new[t, h].float().cpu()
                got = host_kv[slot, kv, off].float() * scale[h, kv]
                assert ((got - value).abs() <= value.abs() / 16 + scale[h, kv] * 2.0 ** -9).all()
    if abstracts:  # from the exact key (the page's running values started at 0)
        page, k = start // P, k_new[0].cpu()
        assert same_bits(results[0][3][:, page].cpu(), torch.minimum(k, torch.zeros_like(k)))
        assert same_bits(results[0][4][:, page].cpu(), torch.maximum(k, torch.zeros_like(k)))


@pytest.mark.parametrize("hkv,P,d,num_pages,dtype", [(3, 16, 64, 7, F16), (2, 32, 128, 5, BF16), (4, 16, 128, 3, F32)])
def test_fp8_gather_decodes_and_admission_copies_codes(hkv, P, d, num_pages, dtype):
    store, _ = fp8_store(hkv, 10, P, d, seed=num_pages)
    results = []
    for fn in (gather_pages_to_staging, ref.gather_pages_to_staging):
        staging_k = torch.full((hkv, num_pages * P + 3, d), float("nan"), dtype=dtype, device=DEVICE)
        staging_v = torch.full_like(staging_k, float("nan"))
        fn(store.host_kv, store.host_slot, num_pages, staging_k, staging_v, kv_scale=store.kv_scale)
        results.append((staging_k.cpu(), staging_v.cpu()))
    assert same_bits(results[0][0], results[1][0]) and same_bits(results[0][1], results[1][1])
    n = num_pages * P
    assert same_bits(results[0][0][:, :n], store.true_k[:, :num_pages].reshape(hkv, n, d).to(dtype))
    assert same_bits(results[0][1][:, :n], store.true_v[:, :num_pages].reshape(hkv, n, d).to(dtype))
    # Admission moves codes, byte for byte.
    sel_pages, sel_lens = store.select(kmax=6)
    admitted = [run_admit(store, sel_pages, sel_lens, fn) for fn in (admit_pages, ref.admit_pages)]
    for a, b in zip(*admitted):
        assert same_bits(a, b)


@pytest.mark.parametrize("g,d,P,dtype", [(1, 64, 16, F16), (3, 128, 32, F32), (4, 64, 32, F16), (8, 128, 16, F32)])
def test_fp8_sparse_decode_attention_matches_reference(g, d, P, dtype):
    """fp8 pools with per-head scales (heads of magnitudes 0.02 .. 30): the kernel equals the torch
    reference over the decoded pages, with partial pages and unused entries."""
    from lcrun.kernels.reference import sparse_decode_attention as ref_sparse
    hkv = 4 if g != 3 else 3
    store, _ = fp8_store(hkv, 12, P, d, seed=g)
    sel_pages, sel_lens = store.select(kmax=9)
    heads = torch.arange(hkv, device=DEVICE, dtype=torch.int32)[:, None]
    sel_slots = (heads * store.max_pages + sel_pages).contiguous()
    codes_k, codes_v = (c.reshape(hkv * store.max_pages, P, d).to(DEVICE) for c in store.codes)
    q = torch.randn(hkv * g, d, generator=store.gen).to(dtype).to(DEVICE)
    got = sparse_decode_attention(q, codes_k, codes_v, sel_slots, sel_lens, num_splits=2, kv_scale=store.kv_scale)
    want = ref_sparse(q, codes_k, codes_v, sel_slots, sel_lens, kv_scale=store.kv_scale)
    assert rel_err(got, want) < TOL[dtype]
    # ... which is attention over the values the codes stand for.
    pool_k, pool_v = (t.reshape(hkv * store.max_pages, P, d).to(DEVICE) for t in (store.true_k, store.true_v))
    assert rel_err(got, ref_sparse(q, pool_k, pool_v, sel_slots, sel_lens)) < TOL[dtype]


# -- GPU only --------------------------------------------------------------------------------------

@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_on_a_pinned_host_page_pool_and_in_a_cuda_graph():
    """The three kernels on CUDA with host_kv in a real HostPagePool (cudaHostRegister, zero-copy
    through HostPointer) against the references; a decode step as the tiered store runs it
    (write-through, admission with a read map, sparse_decode_attention over the pool) replayed in
    a CUDA graph (capture fails on any host synchronisation)."""
    from lcrun.offload.host_pool import HostPagePool
    hkv, g, d, P, max_pages, kmax, dtype = 4, 4, 128, 32, 40, 12, BF16
    store = Store(hkv=hkv, max_pages=max_pages, P=P, d=d, dtype=dtype, num_cache_slots=24, spill=0.2, seed=11)
    slot_bytes = 2 * P * d * 2
    with HostPagePool(store.host_kv.shape[0], slot_bytes, pin=True) as pool:
        assert pool.pinned
        host_kv = pool.slots_view(dtype, (2, P, d))
        host_kv.copy_(store.host_kv)
        store.host_kv = host_kv
        sel_pages, sel_lens = store.select(kmax)
        q = torch.randn(hkv * g, d, generator=store.gen).to(dtype).to(DEVICE)

        admitted, expected_admit = run_admit(store, sel_pages, sel_lens), run_admit(store, sel_pages, sel_lens,
                                                                                    ref.admit_pages)
        assert all(same_bits(a, b) for a, b in zip(admitted, expected_admit))
        mapped, expected_map = (admit_with_read_map(store, sel_pages, sel_lens, fn) for fn in (admit_pages,
                                                                                                 ref.admit_pages))
        assert all(same_bits(a, b) for a, b in zip(mapped, expected_map))

        staging = [torch.full((hkv, max_pages * P, d), float("nan"), dtype=dtype, device=DEVICE) for _ in range(4)]
        full = store.home  # every page resident: the gather needs no spilled page
        gather_pages_to_staging(host_kv, full, 30, staging[0], staging[1])
        ref.gather_pages_to_staging(host_kv, full, 30, staging[2], staging[3])
        assert same_bits(staging[0], staging[2]) and same_bits(staging[1], staging[3])

        # One graph: write the new token, admit the misses (read map), attend; replayed at two positions.
        S = store.gpu_k.shape[0]
        tag, gpu_k, gpu_v = admitted
        overflow = torch.zeros((hkv * kmax, P, d), dtype=dtype, device=DEVICE)
        pool_k, pool_v = torch.cat([gpu_k, overflow]), torch.cat([gpu_v, overflow])
        read_slot, read_lens = torch.zeros_like(sel_pages), torch.zeros_like(sel_lens)
        store.host_slot = full
        seq = torch.tensor([20 * P + 3], dtype=torch.int32, device=DEVICE)
        k_new = torch.randn(1, hkv, d, generator=store.gen).to(dtype).to(DEVICE)
        v_new = torch.randn(1, hkv, d, generator=store.gen).to(dtype).to(DEVICE)
        out = torch.empty_like(q)

        def step():
            write_through(k_new, v_new, seq, host_kv, store.host_slot, pool_k[:S], pool_v[:S], store.cache_slot, tag)
            admit_pages(sel_pages, sel_lens, store.cache_slot, tag, store.host_slot, host_kv, pool_k, pool_v,
                        read_slot=read_slot, read_lens=read_lens, overflow=S)
            sparse_decode_attention(q, pool_k, pool_v, read_slot, read_lens, out=out)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # compile outside the capture
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for pos in (20 * P + 3, 21 * P):
            seq.fill_(pos)
            before = [t.clone() for t in (tag, pool_k, pool_v)]
            host_before = host_kv.clone()
            graph.replay()
            torch.cuda.synchronize()
            p, off = divmod(pos, P)
            for h in range(hkv):
                slot = int(store.host_slot[h, p])
                assert same_bits(host_kv[slot, 0, off], k_new[0, h]) and same_bits(host_kv[slot, 1, off], v_new[0, h])
            # Replay the same step with the references from the saved state.
            tag_ref, k_ref, v_ref = before
            ref.write_through(k_new, v_new, seq, host_before, store.host_slot, k_ref[:S], v_ref[:S], store.cache_slot,
                              tag_ref)
            assert same_bits(host_before, host_kv)
            slot_ref, lens_ref = torch.zeros_like(read_slot), torch.zeros_like(read_lens)
            ref.admit_pages(sel_pages, sel_lens, store.cache_slot, tag_ref, store.host_slot, host_before, k_ref, v_ref,
                            read_slot=slot_ref, read_lens=lens_ref, overflow=S)
            assert torch.equal(tag_ref, tag) and torch.equal(slot_ref, read_slot) and torch.equal(lens_ref, read_lens)
            assert same_bits(k_ref, pool_k) and same_bits(v_ref, pool_v)
            assert torch.equal(read_lens, sel_lens)  # every page is in the host pool: all read
            expected = reference.sparse_decode_attention(q, k_ref, v_ref, slot_ref, lens_ref)
            assert rel_err(out, expected) < TOL[dtype]
        host_kv = store = None  # the graph step closes over both: release them before the pool
        torch.cuda.synchronize()
