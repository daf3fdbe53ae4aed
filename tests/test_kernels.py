"""Page kernels against their torch references (and the references against float64 math).

Without CUDA the Triton kernels run in the interpreter on CPU tensors: TRITON_INTERPRET must be
set before the kernel modules are imported (Triton reads it when @triton.jit decorates a kernel).
With CUDA the same tests run the compiled kernels on the GPU.
"""

import pytest
import torch

from lcrun.kernels import max_entries, plan_selection, reference, select_pages, select_with_plan, write_kv  # noqa: E402
from lcrun.kernels import select as torch_select  # noqa: E402

from triton_env import DEVICE, require_triton  # noqa: E402

require_triton()

from lcrun.kernels.abstracts import update_abstracts  # noqa: E402
from lcrun.kernels.paged_prefill import paged_prefill_attention  # noqa: E402
from lcrun.kernels.score import score_pages  # noqa: E402
from lcrun.kernels.select_kernels import assemble_selection, selection_bounds  # noqa: E402
from lcrun.kernels.sparse_decode import sparse_decode_attention  # noqa: E402
from lcrun.kernels.triton_support import pdl_enabled, pdl_launch, pdl_override  # noqa: E402
from lcrun.kernels import topk  # noqa: E402
from lcrun.kernels.backend import kernel_backend  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# ||out - ref|| / ||ref|| bounds: output rounding of the dtype plus fp32 reordering.
TOL = {F32: 1e-5, F16: 2e-3, BF16: 1.5e-2}
gpu = pytest.mark.gpu


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def random_paged_kv(hkv, max_pages, page_size, d, dtype, seed=0):
    """Pools with a shuffled page table, so kernels that ignore the table fail."""
    gen = torch.Generator().manual_seed(seed)
    num_slots = hkv * max_pages + 3  # spare slots: slot ids are not a simple function of (h, p)
    k_pool = torch.randn(num_slots, page_size, d, generator=gen).to(dtype).to(DEVICE)
    v_pool = torch.randn(num_slots, page_size, d, generator=gen).to(dtype).to(DEVICE)
    table = torch.randperm(num_slots, generator=gen)[: hkv * max_pages].reshape(hkv, max_pages)
    return k_pool, v_pool, table.to(torch.int32).to(DEVICE), gen


def i32(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int32, device=DEVICE)


# -- references against float64 -----------------------------------------------------------------

def test_reference_sparse_decode_matches_float64():
    hkv, g, d, P = 2, 3, 32, 8
    k_pool, v_pool, table, gen = random_paged_kv(hkv, 6, P, d, F32)
    q = torch.randn(hkv * g, d, generator=gen).to(DEVICE)
    sel_slots = table[:, [0, 2, 5, 1]].contiguous()
    sel_lens = torch.tensor([[8, 3, 0, 8], [1, 8, 8, 0]], dtype=torch.int32, device=DEVICE)
    out = reference.sparse_decode_attention(q, k_pool, v_pool, sel_slots, sel_lens, 0.3)
    for head in range(hkv * g):
        kv = head // g
        toks = [(int(s), t) for s, n in zip(sel_slots[kv], sel_lens[kv]) for t in range(int(n))]
        keys = torch.stack([k_pool[s, t] for s, t in toks]).double()
        values = torch.stack([v_pool[s, t] for s, t in toks]).double()
        expected = torch.softmax(keys @ q[head].double() * 0.3, dim=0) @ values
        assert rel_err(out[head], expected) < 1e-6


def test_reference_prefill_matches_float64():
    hkv, g, d, P, T, start = 2, 2, 32, 8, 5, 11
    k_pool, v_pool, table, gen = random_paged_kv(hkv, 3, P, d, F32)
    q = torch.randn(T, hkv * g, d, generator=gen).to(DEVICE)
    out = reference.paged_prefill_attention(q, k_pool, v_pool, table, start, 0.2)
    for i in range(T):
        for head in range(hkv * g):
            kv, n = head // g, start + i + 1
            keys = torch.stack([k_pool[table[kv, p // P], p % P] for p in range(n)]).double()
            values = torch.stack([v_pool[table[kv, p // P], p % P] for p in range(n)]).double()
            expected = torch.softmax(keys @ q[i, head].double() * 0.2, dim=0) @ values
            assert rel_err(out[i, head], expected) < 1e-6


# -- write_kv --------------------------------------------------------------------------------------

@pytest.mark.parametrize("device_start", [False, True])
def test_write_kv_goes_through_the_table(device_start):
    hkv, d, P, T, start = 3, 16, 8, 13, 6
    k_pool, v_pool, table, gen = random_paged_kv(hkv, 4, P, d, F32)
    k = torch.randn(T, hkv, d, generator=gen).to(DEVICE)
    v = torch.randn(T, hkv, d, generator=gen).to(DEVICE)
    write_kv(k_pool, v_pool, table, k, v, i32(start) if device_start else start)
    for t in range(T):
        pos = start + t
        for h in range(hkv):
            assert torch.equal(k_pool[table[h, pos // P], pos % P], k[t, h])
            assert torch.equal(v_pool[table[h, pos // P], pos % P], v[t, h])


# -- update_abstracts ------------------------------------------------------------------------------

@pytest.mark.parametrize("P,d,dtype", [(16, 64, F32), (32, 128, F16), (64, 64, BF16), (32, 64, F32)])
def test_update_abstracts(P, d, dtype):
    hkv, max_pages = 3, 7
    k_pool, _, table, _ = random_paged_kv(hkv, max_pages, P, d, dtype)
    pages = torch.tensor([0, 5, 2], dtype=torch.int32, device=DEVICE)
    kmin = torch.full((hkv, max_pages, d), float("nan"), dtype=dtype, device=DEVICE)
    kmax = kmin.clone()
    update_abstracts(k_pool, table, kmin, kmax, pages)
    ref_min, ref_max = kmin.clone(), kmax.clone()
    reference.update_abstracts(k_pool, table, ref_min, ref_max, pages)
    touched = pages.long()
    assert torch.equal(kmin[:, touched], ref_min[:, touched])
    assert torch.equal(kmax[:, touched], ref_max[:, touched])
    untouched = [p for p in range(max_pages) if p not in touched.tolist()]
    assert kmin[:, untouched].isnan().all() and kmax[:, untouched].isnan().all()


def test_update_abstracts_partial_page_ignores_unwritten_tokens():
    hkv, max_pages, P, d = 2, 4, 16, 64
    k_pool, _, table, _ = random_paged_kv(hkv, max_pages, P, d, F16)
    seq_len = i32(2 * P + 5)  # page 2 holds 5 tokens
    page = torch.tensor([2], dtype=torch.int32, device=DEVICE)
    kmin = torch.full((hkv, max_pages, d), float("nan"), dtype=F16, device=DEVICE)
    kmax = kmin.clone()
    update_abstracts(k_pool, table, kmin, kmax, page, seq_len)
    written = k_pool[table[:, 2].long(), :5]  # (Hkv, 5, D)
    assert torch.equal(kmin[:, 2], written.amin(dim=1)) and torch.equal(kmax[:, 2], written.amax(dim=1))
    ref_min, ref_max = torch.zeros_like(kmin), torch.zeros_like(kmax)
    reference.update_abstracts(k_pool, table, ref_min, ref_max, page, seq_len)
    assert torch.equal(ref_min[:, 2], kmin[:, 2]) and torch.equal(ref_max[:, 2], kmax[:, 2])


# -- score_pages -----------------------------------------------------------------------------------

@pytest.mark.parametrize("g,d,dtype,reduce,block_pages,kernel,programs", [
    (1, 64, F32, "max", None, "grid", None), (3, 128, F16, "sum", None, "grid", None),
    (4, 64, BF16, "max", 16, "grid", None), (8, 128, F32, "sum", 16, "grid", None),
    (4, 128, F16, "max", None, "grid", None), (3, 64, F32, "max", 16, "grid", None),
    (4, 128, BF16, "max", 16, "mma", 2), (3, 64, F16, "sum", 32, "mma", 1), (4, 64, F32, "max", 16, "mma", 5),
    (8, 128, BF16, "sum", 64, "mma", None), (1, 64, BF16, "max", None, "mma", 3),
])
def test_score_pages(g, d, dtype, reduce, block_pages, kernel, programs):
    """kernel: one program per block of pages (CUDA cores) or a few pipelined programs per KV head
    (tensor cores: relu(Q) kmax^T + min(Q, 0) kmin^T)."""
    hkv, max_pages, num_full = 2, 50, 37
    gen = torch.Generator().manual_seed(g * d)
    keys = torch.randn(hkv, max_pages, 8, d, generator=gen)
    kmin, kmax = keys.amin(2).to(dtype).to(DEVICE), keys.amax(2).to(dtype).to(DEVICE)
    q = torch.randn(hkv * g, d, generator=gen).to(dtype).to(DEVICE)
    out = torch.full((hkv, max_pages), float("nan"), device=DEVICE)
    scores = score_pages(q, kmin, kmax, i32(num_full), reduce, block_pages=block_pages, out=out,
                         kernel=kernel, programs_per_head=programs)
    ref = reference.score_pages(q, kmin, kmax, i32(num_full), reduce)
    assert scores.data_ptr() == out.data_ptr()
    assert torch.isinf(scores[:, num_full:]).all() and (scores[:, num_full:] < 0).all()
    assert rel_err(scores[:, :num_full], ref[:, :num_full]) < 1e-5


def test_score_is_an_upper_bound_of_every_key_in_the_page():
    hkv, max_pages, P, d = 2, 5, 16, 64
    k_pool, _, table, gen = random_paged_kv(hkv, max_pages, P, d, F32)
    kmin = torch.empty(hkv, max_pages, d, device=DEVICE)
    kmax = torch.empty_like(kmin)
    update_abstracts(k_pool, table, kmin, kmax, torch.arange(max_pages, dtype=torch.int32, device=DEVICE))
    q = torch.randn(hkv, d, generator=gen).to(DEVICE)  # G = 1
    scores = score_pages(q, kmin, kmax, i32(max_pages), "max")
    exact = torch.einsum("hptd,hd->hpt", k_pool[table.long()], q).amax(-1)
    assert (scores >= exact - 1e-4).all()


# -- sparse_decode_attention -----------------------------------------------------------------------

@pytest.mark.parametrize("g,d,P,dtype,num_splits", [
    (1, 64, 16, F32, None), (3, 128, 32, F16, 2), (4, 64, 32, BF16, 3),
    (8, 128, 16, F16, 1), (4, 128, 64, F32, 2), (8, 64, 32, BF16, None),
])
def test_sparse_decode_attention(g, d, P, dtype, num_splits):
    hkv, max_pages, kmax = 2, 9, 7
    k_pool, v_pool, table, gen = random_paged_kv(hkv, max_pages, P, d, dtype, seed=g + d + P)
    q = torch.randn(hkv * g, d, generator=gen).to(dtype).to(DEVICE)
    pages = torch.stack([torch.randperm(max_pages, generator=gen)[:kmax] for _ in range(hkv)]).to(DEVICE)
    sel_slots = table.gather(1, pages).contiguous()
    lens = torch.full((hkv, kmax), P, dtype=torch.int32)
    lens[0, 1], lens[0, 4], lens[1, 0], lens[1, 6] = 0, P // 2 + 1, 3, 0  # unused and partial entries
    sel_lens = lens.to(DEVICE)
    out = torch.full((hkv * g, d), float("nan"), dtype=dtype, device=DEVICE)
    sparse_decode_attention(q, k_pool, v_pool, sel_slots, sel_lens, num_splits=num_splits, out=out)
    ref = reference.sparse_decode_attention(q, k_pool, v_pool, sel_slots, sel_lens)
    assert rel_err(out, ref) < TOL[dtype]


def test_sparse_decode_empty_selection_and_num_entries():
    hkv, g, d, P, kmax = 2, 4, 64, 16, 6
    k_pool, v_pool, table, gen = random_paged_kv(hkv, kmax, P, d, F16)
    q = torch.randn(hkv * g, d, generator=gen).to(F16).to(DEVICE)
    sel_slots = table.contiguous()
    sel_lens = torch.full((hkv, kmax), P, dtype=torch.int32, device=DEVICE)
    sel_lens[1] = 0  # KV head 1 selects nothing: its query heads get zeros
    out = sparse_decode_attention(q, k_pool, v_pool, sel_slots, sel_lens, num_splits=3, num_entries=i32(4))
    ref = reference.sparse_decode_attention(q, k_pool, v_pool, sel_slots, sel_lens, num_entries=i32(4))
    assert torch.equal(out[g:], torch.zeros_like(out[g:]))
    assert rel_err(out[:g], ref[:g]) < TOL[F16]
    first4 = reference.sparse_decode_attention(q, k_pool, v_pool, sel_slots[:, :4].contiguous(),
                                               sel_lens[:, :4].contiguous())
    assert rel_err(out[:g], first4[:g]) < TOL[F16]


# -- paged_prefill_attention -----------------------------------------------------------------------

@pytest.mark.parametrize("g,d,P,dtype,T,start", [
    (1, 64, 16, F32, 37, 50), (3, 128, 32, F16, 70, 33), (4, 64, 32, BF16, 20, 0),
    (8, 64, 16, F16, 1, 45), (4, 128, 64, F32, 65, 71), (3, 64, 32, BF16, 100, 200),
])
def test_paged_prefill_attention(g, d, P, dtype, T, start):
    hkv = 2
    max_pages = -(-(start + T) // P) + 1
    k_pool, v_pool, table, gen = random_paged_kv(hkv, max_pages, P, d, dtype, seed=T + start)
    q = torch.randn(T, hkv * g, d, generator=gen).to(dtype).to(DEVICE)
    out = torch.full((T, hkv * g, d), float("nan"), dtype=dtype, device=DEVICE)
    paged_prefill_attention(q, k_pool, v_pool, table, start, out=out)
    ref = reference.paged_prefill_attention(q, k_pool, v_pool, table, start)
    assert rel_err(out, ref) < TOL[dtype]


# -- selection (torch ops, no Triton) --------------------------------------------------------------

def _selected(sel_slots, sel_lens, table):
    """Per KV head: {logical page: tokens} of the used entries (asserting no page repeats)."""
    result = []
    for h in range(sel_slots.shape[0]):
        slot_to_page = {int(s): p for p, s in enumerate(table[h].tolist())}
        chosen = {}
        for slot, n in zip(sel_slots[h].tolist(), sel_lens[h].tolist()):
            if n:
                page = slot_to_page[slot]
                assert page not in chosen, "a page selected twice"
                chosen[page] = n
        result.append(chosen)
    return result


def _tokens_of(page, seq_len, P):
    return max(0, min(P, seq_len - page * P))


@pytest.mark.parametrize("P,S,W,B", [(16, 32, 64, 256), (32, 64, 128, 512), (16, 20, 40, 100)])
def test_selection_is_dense_up_to_the_budget(P, S, W, B):
    hkv, max_pages = 2, 40
    _, _, table, gen = random_paged_kv(hkv, max_pages, P, 4, F32)
    for seq_len in range(1, B + 1, 7):
        scores = torch.randn(hkv, max_pages, generator=gen).to(DEVICE)
        scores[:, seq_len // P:] = float("-inf")
        sel_slots, sel_lens = select_pages(scores, table, i32(seq_len), P, S, W, B)
        assert sel_slots.shape == (hkv, min(max_entries(P, S, W, B), max_pages))
        n_pages = -(-seq_len // P)
        for chosen in _selected(sel_slots, sel_lens, table):
            assert chosen == {p: _tokens_of(p, seq_len, P) for p in range(n_pages)}


@pytest.mark.parametrize("P,S,W,B", [(16, 32, 64, 256), (32, 64, 128, 512), (16, 0, 0, 64), (32, 40, 70, 142)])
def test_selection_rules(P, S, W, B):
    hkv, max_pages = 3, 80
    _, _, table, gen = random_paged_kv(hkv, max_pages, P, 4, F32)
    kmax = max_entries(P, S, W, B)
    aligned = S % P == 0 and W % P == 0
    for seq_len in list(range(B + 1, max_pages * P + 1, 37)) + [max_pages * P]:
        scores = torch.randn(hkv, max_pages, generator=gen).to(DEVICE)
        scores[:, seq_len // P:] = float("-inf")
        plan = plan_selection(i32(seq_len), max_pages, P, S, W, B)
        sel_slots, sel_lens = select_with_plan(scores, table, plan)
        assert sel_slots.shape == sel_lens.shape == (hkv, kmax)
        assert sel_slots.dtype == sel_lens.dtype == torch.int32
        assert (sel_slots[sel_lens == 0] == 0).all()
        n_pages = -(-seq_len // P)
        sinks = set(range(min(-(-S // P), n_pages)))
        window = set(range(min(max(seq_len - W, 0) // P, n_pages - 1), n_pages))
        forced = sinks | window
        forced_tokens = sum(_tokens_of(p, seq_len, P) for p in forced)
        for h, chosen in enumerate(_selected(sel_slots, sel_lens, table)):
            assert forced <= set(chosen)
            assert all(n == _tokens_of(p, seq_len, P) for p, n in chosen.items())
            if aligned:  # forced pages fit: the budget holds
                assert sum(chosen.values()) <= B
            top = set(chosen) - forced
            candidates = [p for p in range(seq_len // P) if p not in forced]
            assert len(top) == min(len(candidates), max(B - forced_tokens, 0) // P)
            best = sorted(candidates, key=lambda p: -scores[h, p].item())[: len(top)]
            assert top == set(best)


@pytest.mark.parametrize("P,S,W,B", [(16, 32, 64, 256), (32, 40, 70, 142), (16, 0, 0, 64)])
def test_triton_selection_matches_torch_selection(P, S, W, B):
    """The Triton bounds + assembly (and score masking by bounds) give the torch selection."""
    hkv, max_pages, d = 2, 40, 64
    k_pool, _, table, gen = random_paged_kv(hkv, max_pages, P, d, F32)
    kmin = torch.empty(hkv, max_pages, d, device=DEVICE)
    kmax = torch.empty_like(kmin)
    update_abstracts(k_pool, table, kmin, kmax, torch.arange(max_pages, dtype=torch.int32, device=DEVICE))
    for seq_len in [1, P - 1, P, B - 1, B, B + 1, B + P + 3, 17 * P, max_pages * P - 5, max_pages * P]:
        n = i32(seq_len)
        bounds = selection_bounds(n, P, S, W, B)
        assert torch.equal(bounds, torch_select.selection_bounds(n, P, S, W, B)), seq_len
        q = torch.randn(hkv * 2, d, generator=gen).to(DEVICE)
        num_full = i32(seq_len // P)
        plain = score_pages(q, kmin, kmax, num_full)
        masked = score_pages(q, kmin, kmax, num_full, candidates=bounds)
        ref = reference.score_pages(q, kmin, kmax, num_full, candidates=bounds)
        assert torch.equal(masked.isinf(), ref.isinf()) and torch.allclose(masked, ref, rtol=1e-5)
        mma = score_pages(q, kmin, kmax, num_full, candidates=bounds, kernel="mma", block_pages=16, programs_per_head=2)
        assert torch.equal(mma.isinf(), ref.isinf()) and torch.allclose(mma, ref, rtol=1e-5)
        plan = plan_selection(n, max_pages, P, S, W, B, bounds_fn=selection_bounds)
        expected = select_with_plan(plain, table, plan)
        got = select_with_plan(masked, table, plan, assemble=assemble_selection, masked=True)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), seq_len


# -- fused top-k selection (lcrun.kernels.topk) -----------------------------------------------------

def _check_topk(scores, k, method="filter", **kw):
    """topk_indices picks k distinct in-range columns whose values are torch.topk's values."""
    idx = topk.topk_indices(scores, k, method=method, **kw)
    assert idx.shape == (scores.shape[0], k) and idx.dtype == torch.int32
    idx = idx.long()
    assert ((idx >= 0) & (idx < scores.shape[1])).all()
    for row in idx.tolist():
        assert len(set(row)) == k, "an index chosen twice"
    expected = torch.topk(scores, k, dim=1).values
    assert torch.equal(scores.gather(1, idx).sort(dim=1, descending=True).values, expected)
    return idx


@pytest.mark.parametrize("n,k", [(7, 3), (100, 46), (129, 65), (1000, 46), (3001, 65), (4096, 200), (50, 50)])
@pytest.mark.parametrize("kind", ["random", "ties", "neg_inf", "few_finite"])
def test_topk_indices_matches_torch_topk(n, k, kind):
    """Exact against torch.topk on the values: distinct scores, heavy ties, -inf entries, rows with
    fewer finite entries than k (the k-th value is -inf). Both the threshold path and the bisection."""
    gen = torch.Generator().manual_seed(n * 7 + k)
    scores = torch.randn(3, n, generator=gen)
    if kind == "ties":
        scores = torch.randint(0, 4, (3, n), generator=gen).float()  # the threshold path falls back
    elif kind == "neg_inf":
        scores[torch.rand(3, n, generator=gen) < 0.5] = float("-inf")
    elif kind == "few_finite":
        scores[:, max(1, k // 2):] = float("-inf")
        scores[1] = float("-inf")  # no finite entry at all
    scores = scores.to(DEVICE)
    _check_topk(scores, k)
    _check_topk(scores, k, method="bisect")


def test_topk_indices_order_and_ties():
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(4, 5000, generator=gen).to(DEVICE)
    idx = _check_topk(scores, 46)
    assert torch.equal(idx, torch.topk(scores, 46, dim=1).indices)  # fast path: sorted by falling score
    assert torch.equal(topk.topk_indices(scores, 46), topk.topk_indices(scores, 46))  # deterministic
    equal = torch.zeros(2, 3000, device=DEVICE)  # all tied: the smallest indices win, both paths
    for method in topk.METHODS:
        assert topk.topk_indices(equal, 10, method=method).tolist() == [list(range(10))] * 2
    assert topk.topk_indices(scores, 0).shape == (4, 0)
    half = scores.half()  # fp16/bf16 rows are ranked in fp32
    _check_topk(half, 8)


@pytest.mark.parametrize("hot_groups", [0, 2])
def test_topk_ranks_small_and_large_survivor_sets(hot_groups):
    """Pages above the threshold are ranked in a half-size block when few pass (random rows) and in
    the full block when more do: here every page of two strided groups (page i is in group i % 128
    at k = 46) is large, so ~64 + ~44 pages pass. Both give torch.topk's order exactly."""
    gen = torch.Generator().manual_seed(11 + hot_groups)
    n, k, groups = 4096, 46, 128
    scores = torch.randn(3, n, generator=gen)
    for g in range(hot_groups):
        scores[:, g::groups] += 10.0
    idx = _check_topk(scores.to(DEVICE), k)
    assert torch.equal(idx.cpu().long(), torch.topk(scores, k, dim=1).indices)


# One head (every length) and eight (the per-head indexing): a two-head case saw nothing more.
@pytest.mark.parametrize("hkv", [1, 8])
@pytest.mark.parametrize("P,S,W,B,max_pages", [
    (32, 64, 512, 2048, 600), (16, 32, 64, 256, 90), (16, 0, 0, 64, 300), (32, 40, 70, 142, 2100),
])
def test_fused_selection_matches_select_with_plan(hkv, P, S, W, B, max_pages):
    """select_top_pages (one launch) gives select_with_plan's selection: identical entries for distinct
    scores (masked by the plan or not), the same set per head under ties and with the bisection."""
    gen = torch.Generator().manual_seed(hkv * 1000 + max_pages)
    table = torch.randperm(hkv * max_pages + 3, generator=gen)[: hkv * max_pages].reshape(hkv, max_pages)
    table = table.to(torch.int32).to(DEVICE)
    capacity = max_pages * P
    lengths = [1, P - 1, B - 3, B + 1, B + P + 3, capacity // 3 + 5, capacity - 7, capacity]
    # Fewer lengths with more heads: the interpreter runs the programs one by one.
    for seq_len in lengths if hkv == 1 else lengths[1::4]:
        n = i32(seq_len)
        plan = plan_selection(n, max_pages, P, S, W, B, bounds_fn=selection_bounds)
        scores = torch.randn(hkv, max_pages, generator=gen).to(DEVICE)
        scores[:, seq_len // P:] = float("-inf")
        expected = select_with_plan(scores, table, plan)
        got = topk.select_top_pages(scores, table, plan)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), seq_len
        masked = torch.where(torch_select.candidate_mask(plan.bounds, max_pages), scores, float("-inf"))
        got = topk.select_top_pages(masked, table, plan, masked=True)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), seq_len
        bisect = topk.select_top_pages(scores, table, plan, method="bisect")
        assert torch.equal(bisect[0].sort(dim=1).values, expected[0].sort(dim=1).values), seq_len
        assert torch.equal(bisect[1].sort(dim=1).values, expected[1].sort(dim=1).values), seq_len
        # Ties: the chosen pages may differ from torch.topk's, their scores may not.
        tied = scores.round()
        got = topk.select_top_pages(tied, table, plan)
        want = select_with_plan(tied, table, plan)
        assert torch.equal(got[1].sum(dim=1), want[1].sum(dim=1))
        assert torch.equal(_top_scores(got, tied, table), _top_scores(want, tied, table)), seq_len


def _top_scores(selection, scores, table):
    """Per KV head, the sorted scores of the selected pages (slot -> page through the table)."""
    slots, lens = selection
    rows = []
    for h in range(slots.shape[0]):
        page_of = {int(s): p for p, s in enumerate(table[h].tolist())}
        pages = [page_of[int(s)] for s, n in zip(slots[h].tolist(), lens[h].tolist()) if n]
        rows.append(scores[h, pages].sort().values)
    return torch.stack(rows)


def test_backends_register_the_fused_selection():
    triton_ops, torch_ops = kernel_backend(DEVICE), kernel_backend(DEVICE, "torch")
    assert triton_ops.select_top_pages is topk.select_top_pages
    assert torch_ops.select_top_pages is torch_select.select_top_pages
    gen = torch.Generator().manual_seed(3)
    table = torch.arange(2 * 200, dtype=torch.int32).reshape(2, 200).to(DEVICE)
    plan = plan_selection(i32(200 * 16 - 5), 200, 16, 32, 64, 256, bounds_fn=selection_bounds)
    scores = torch.randn(2, 200, generator=gen).to(DEVICE)
    a, b = triton_ops.select_top_pages(scores, table, plan), torch_ops.select_top_pages(scores, table, plan)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -- GPU only --------------------------------------------------------------------------------------

@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("max_pages,num_warps", [(4096, None), (32768, None), (32768, 32), (20000, None)])
def test_fused_selection_at_scale(max_pages, num_warps):
    """Compiled kernel at runtime sizes (128K..1.25M tokens at P = 32): equal to torch.topk + assembly."""
    hkv, P = 8, 32
    gen = torch.Generator().manual_seed(max_pages)
    table = torch.randperm(hkv * max_pages, generator=gen).reshape(hkv, max_pages).to(torch.int32).to(DEVICE)
    for seq_len in (max_pages * P - 100, max_pages * P // 2 + 7):
        plan = plan_selection(i32(seq_len), max_pages, P, 64, 512, 2048, bounds_fn=selection_bounds)
        scores = torch.randn(hkv, max_pages, generator=gen).to(DEVICE)
        expected = select_with_plan(scores, table, plan)
        got = topk.select_top_pages(scores, table, plan, num_warps=num_warps)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        slow = topk.select_top_pages(scores, table, plan, num_warps=num_warps, method="bisect")
        assert torch.equal(slow[0].sort(dim=1).values, expected[0].sort(dim=1).values)
    scores = torch.randn(hkv, max_pages, generator=gen).to(DEVICE)
    _check_topk(scores, 65, num_warps=num_warps)
    _check_topk(scores.round(), 65, num_warps=num_warps)  # ties: the fallback



@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused,kernel,pdl", [(False, "grid", False), (True, "grid", False), (True, "mma", False),
                                              (True, "grid", True), (True, "mma", True)])
def test_decode_step_captures_in_a_cuda_graph(fused, kernel, pdl):
    """Score + select + attend, with lengths only on the device, replays in a CUDA graph
    (capture fails on any host synchronisation) and tracks a changing seq_len; with programmatic
    dependent launch (Hopper+) too, whose early-launched kernels must still see their inputs."""
    with pdl_override(pdl):
        _decode_step_in_graph(fused, kernel)


def _decode_step_in_graph(fused, kernel):
    hkv, g, d, P, max_pages = 8, 4, 128, 32, 256
    k_pool, v_pool, table, gen = random_paged_kv(hkv, max_pages, P, d, BF16)
    kmin = torch.empty(hkv, max_pages, d, dtype=BF16, device=DEVICE)
    kmax = torch.empty_like(kmin)
    update_abstracts(k_pool, table, kmin, kmax, torch.arange(max_pages, dtype=torch.int32, device=DEVICE))
    q = torch.randn(hkv * g, d, generator=gen).to(BF16).to(DEVICE)
    seq_len, num_full = i32(5000), i32(5000 // P)
    out = torch.empty(hkv * g, d, dtype=BF16, device=DEVICE)

    def step():
        plan = plan_selection(seq_len, max_pages, P, 64, 512, 2048, bounds_fn=selection_bounds)
        scores = score_pages(q, kmin, kmax, num_full, "max", candidates=plan.bounds, kernel=kernel)
        if fused:
            slots, lens = topk.select_top_pages(scores, table, plan)
        else:
            slots, lens = select_with_plan(scores, table, plan, assemble=assemble_selection, masked=True)
        sparse_decode_attention(q, k_pool, v_pool, slots, lens, out=out)
        return slots, lens

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        slots, lens = step()
    for n in (5000, 7001):
        seq_len.fill_(n)
        num_full.fill_(n // P)
        graph.replay()
        torch.cuda.synchronize()
        ref = reference.sparse_decode_attention(q, k_pool, v_pool, slots, lens)
        assert rel_err(out, ref) < TOL[BF16]
        assert int(lens.sum(dim=1).max()) <= 2048
        plan = plan_selection(seq_len, max_pages, P, 64, 512, 2048)
        expected = select_with_plan(score_pages(q, kmin, kmax, num_full, "max"), table, plan)
        assert torch.equal(slots.sort(dim=1).values, expected[0].sort(dim=1).values), n


def test_pdl_is_off_where_it_cannot_run():
    """Programmatic dependent launch only on compiled CUDA kernels: never on CPU tensors (the
    interpreter has no grid dependency control), whatever the override says."""
    cpu = torch.device("cpu")
    assert not pdl_enabled(cpu)
    with pdl_override(True):
        assert not pdl_enabled(cpu)
    assert pdl_launch(False) == {} and pdl_launch(True) == {"launch_pdl": True}
