"""Window positions in the decode kernel (lcrun.kernels.key_rotation): sparse_decode_attention with a
KeyRotation against the torch reference and against independent float64 paths (the pool's keys
rotated explicitly; the pre-RoPE keys rotated straight to their window positions), and the
page-relative abstracts against a direct min/max."""
import math

import pytest
import torch

from lcrun.kernels import reference
from lcrun.kernels.key_rotation import (KeyRotation, update_relative_abstract_reference, update_relative_abstracts,
                                        window_deltas)

from triton_env import DEVICE, require_triton  # noqa: E402

require_triton()

from lcrun.kernels.backend import kernel_backend  # noqa: E402
from lcrun.kernels.key_rotation import update_relative_abstract  # noqa: E402
from lcrun.kernels.sparse_decode import sparse_decode_attention  # noqa: E402

F32, F16, BF16, FP8 = torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn
TOL = {F32: 1e-5, F16: 2e-3, BF16: 1.5e-2}  # ||out - ref|| / ||ref||, as tests/test_kernels.py
gpu = pytest.mark.gpu


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()  # the independent paths run on the CPU
    return ((out - ref).norm() / ref.norm()).item()


def inv_freq(d: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)


def rope64(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """HF rotate_half RoPE in float64, as lcrun.runtime.rope.Rotary: x (..., D), angle (..., D/2)."""
    emb = torch.cat((angle, angle), dim=-1).double()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x.double() * emb.cos() + rotated.double() * emb.sin()


def window_position(pos: int, P: int, S: int, ls: int, shift: int) -> int:
    """Where token ``pos`` sits in the window layout [S, ls, shift] (by its page's first token)."""
    start = pos // P * P
    if start < S:
        return pos
    if start >= ls:
        return pos - shift
    return S + pos - start


def dense_attention(q: torch.Tensor, keys: list, values: list, g: int) -> torch.Tensor:
    """float64 softmax attention: q (Hkv*G, D); keys/values: per KV head an (N, D) float64."""
    d = q.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for h, (k, v) in enumerate(zip(keys, values)):
        if len(k):
            qh = q[h * g:(h + 1) * g].double().cpu()
            out[h * g:(h + 1) * g] = torch.softmax(qh @ k.T / math.sqrt(d), dim=-1) @ v
    return out


class Case:
    """Pools of keys post-RoPE at their true positions, a selection with sink, far and local pages
    (a partial last page, unused entries), and a random window layout."""

    def __init__(self, hkv, g, d, P, dtype, identity, seed, pool_dtype=None, max_pages=10, kmax=7, layout=None):
        gen = torch.Generator().manual_seed(seed)
        pool_dtype = pool_dtype or dtype
        self.g, self.P, self.dtype = g, P, dtype
        n_tokens = max_pages * P - (P // 2 + 1)  # the last page is partial
        self.freq = inv_freq(d).float()
        self.k_pre = torch.randn(hkv, max_pages, P, d, generator=gen, dtype=torch.float64)
        true_pos = torch.arange(max_pages * P).view(max_pages, P)
        k_post = rope64(self.k_pre, true_pos[..., None] * self.freq.double())
        v = torch.randn(hkv, max_pages, P, d, generator=gen, dtype=torch.float64)
        if layout is None:
            S = [0, P, 2 * P, P + 3][seed % 4]
            ls = int(torch.randint(S + 2 * P, (max_pages - 2) * P + 1, (1,), generator=gen))
            shift = int(torch.randint(-P, ls - S + 1, (1,), generator=gen))
            layout = (S, ls, shift)
        self.layout = layout

        if identity:
            num_slots = hkv * max_pages
            table = torch.arange(num_slots).view(hkv, max_pages)
        else:  # shuffled slots and spare ones: slot ids say nothing about pages
            num_slots = hkv * max_pages + 3
            table = torch.randperm(num_slots, generator=gen)[:hkv * max_pages].view(hkv, max_pages)
        k_pool = torch.randn(num_slots, P, d, generator=gen, dtype=torch.float64)
        v_pool = torch.randn(num_slots, P, d, generator=gen, dtype=torch.float64)
        k_pool[table], v_pool[table] = k_post, v
        self.kv_scale = None
        if pool_dtype == FP8:  # e4m3 codes, per-head power-of-two scales (lcrun.kernels.tiered's layout)
            scale = torch.zeros(hkv, 4)
            for col, pool in ((0, k_pool), (1, v_pool)):
                amax = pool[table].abs().amax((1, 2, 3))
                scale[:, col] = 2.0 ** torch.ceil(torch.log2(amax / 448.0))
            slot_head = torch.zeros(num_slots, dtype=torch.long)
            slot_head[table.flatten()] = torch.arange(hkv).repeat_interleave(max_pages)
            k_pool = (k_pool / scale[slot_head, 0, None, None].double()).to(FP8)
            v_pool = (v_pool / scale[slot_head, 1, None, None].double()).to(FP8)
            self.true_k = k_pool.double() * scale[slot_head, 0, None, None].double()
            self.true_v = v_pool.double() * scale[slot_head, 1, None, None].double()
            self.kv_scale = scale.to(DEVICE)
        else:
            k_pool, v_pool = k_pool.to(pool_dtype), v_pool.to(pool_dtype)
            self.true_k, self.true_v = k_pool.double(), v_pool.double()
        self.k_pool, self.v_pool = k_pool.to(DEVICE), v_pool.to(DEVICE)

        pages = torch.stack([torch.randperm(max_pages, generator=gen)[:kmax] for _ in range(hkv)])
        lens = (n_tokens - pages * P).clamp(0, P)
        unused = torch.randint(0, kmax, (hkv,), generator=gen)
        lens[torch.arange(hkv), unused] = 0
        slots = table.gather(1, pages)
        slots[torch.arange(hkv), unused] = 0  # any readable slot: never read
        rot_pages = slots if identity else pages.clone()
        if not identity:
            rot_pages[torch.arange(hkv), unused] = 123456  # junk page: its delta is never used
        self.pages, self.lens, self.slots = pages, lens, slots
        self.q = torch.randn(hkv * g, d, generator=gen).to(dtype).to(DEVICE)
        self.sel_slots = slots.to(torch.int32).contiguous().to(DEVICE)
        self.sel_lens = lens.to(torch.int32).contiguous().to(DEVICE)
        self.rotation = KeyRotation(self.freq.to(DEVICE), rot_pages.to(torch.int32).contiguous().to(DEVICE),
                                    max_pages if identity else 0,
                                    torch.tensor(layout, dtype=torch.int32, device=DEVICE))

    def kinds(self) -> set:
        """Which of sink/far/local the live entries cover."""
        S, ls, _ = self.layout
        starts = (self.pages * self.P)[self.lens > 0]
        return {"sink" if s < S else "local" if s >= ls else "far" for s in starts.tolist()}

    def args(self):
        return self.q, self.k_pool, self.v_pool, self.sel_slots, self.sel_lens

    def explicit(self, num_entries=None) -> torch.Tensor:
        """Independent path: the pool's (decoded) keys of each live entry rotated by its delta in
        float64 (the angle delta * inv_freq formed in fp32, as specified), then dense attention."""
        S, ls, shift = self.layout
        keys, values = [], []
        for h in range(self.pages.shape[0]):
            ks, vs = [], []
            for e in range(num_entries if num_entries is not None else self.pages.shape[1]):
                n, p, slot = int(self.lens[h, e]), int(self.pages[h, e]), int(self.slots[h, e])
                if n:
                    delta = window_position(p * self.P, self.P, S, ls, shift) - p * self.P
                    angle = (torch.tensor(float(delta)) * self.freq).double()  # fp32 product
                    ks.append(rope64(self.true_k[slot, :n], angle.expand(n, -1)))
                    vs.append(self.true_v[slot, :n])
            keys.append(torch.cat(ks) if ks else torch.zeros(0))
            values.append(torch.cat(vs) if vs else torch.zeros(0))
        return dense_attention(self.q, keys, values, self.g)

    def at_window_positions(self) -> torch.Tensor:
        """Independent path: the pre-RoPE keys rotated straight to their window positions (no
        composition), then dense attention."""
        S, ls, shift = self.layout
        keys, values = [], []
        for h in range(self.pages.shape[0]):
            ks, vs = [], []
            for e in range(self.pages.shape[1]):
                n, p, slot = int(self.lens[h, e]), int(self.pages[h, e]), int(self.slots[h, e])
                if n:
                    pos = torch.tensor([window_position(p * self.P + t, self.P, S, ls, shift) for t in range(n)])
                    ks.append(rope64(self.k_pre[h, p, :n], pos[:, None] * self.freq.double()))
                    vs.append(self.true_v[slot, :n])
            keys.append(torch.cat(ks) if ks else torch.zeros(0))
            values.append(torch.cat(vs) if vs else torch.zeros(0))
        return dense_attention(self.q, keys, values, self.g)


# -- window deltas -----------------------------------------------------------------------------------

def test_window_deltas_follow_the_layout_rules():
    P, S, ls, shift, max_pages = 16, 35, 112, 40, 9
    logical = torch.tensor([[0, 2, 3, 4, 6, 7, 8], [8, 1, 5, 2, 7, 0, 6]], dtype=torch.int32)
    layout = torch.tensor([S, ls, shift], dtype=torch.int32)
    want = [[window_position(int(p) * P, P, S, ls, shift) - int(p) * P for p in row] for row in logical]
    assert window_deltas(KeyRotation(inv_freq(8).float(), logical, 0, layout), P).tolist() == want
    assert want[0] == [0, 0, S - 48, S - 64, S - 96, -shift, -shift]  # page 2 starts below S: a sink
    identity_slots = logical + torch.tensor([[0], [max_pages]], dtype=torch.int32)
    assert window_deltas(KeyRotation(inv_freq(8).float(), identity_slots, max_pages, layout), P).tolist() == want


# -- sparse_decode_attention with rotation ----------------------------------------------------------

@pytest.mark.parametrize("g,d,P,dtype,identity,num_splits", [
    (1, 64, 16, F32, False, None), (3, 128, 32, F16, True, 2), (4, 256, 16, F32, False, 3),
    (8, 64, 64, BF16, True, 1), (4, 128, 8, F32, True, 2), (3, 64, 32, BF16, False, None),
    (8, 256, 32, F16, False, 2), (1, 128, 64, F16, False, 1), (4, 96, 16, F32, True, 2),
])
def test_rotated_decode_matches_reference_and_independent_paths(g, d, P, dtype, identity, num_splits):
    case = Case(hkv=2, g=g, d=d, P=P, dtype=dtype, identity=identity, seed=g + d + P)
    assert case.kinds() == {"sink", "far", "local"} or case.layout[0] == 0
    out = torch.full_like(case.q, float("nan"))
    sparse_decode_attention(*case.args(), num_splits=num_splits, out=out, rotation=case.rotation)
    ref = reference.sparse_decode_attention(*case.args(), rotation=case.rotation)
    assert rel_err(out, ref) < TOL[dtype]
    explicit = case.explicit()
    assert rel_err(out, explicit) < TOL[dtype]
    assert rel_err(ref, explicit) < TOL[dtype]
    # Composition R(delta) R(true) = R(window): equal up to the fp32 angle of delta (~1e-7 * |delta|).
    assert rel_err(out, case.at_window_positions()) < TOL[dtype] + 5e-4
    # ... and not the unrotated result.
    assert rel_err(out, reference.sparse_decode_attention(*case.args())) > 0.05


@pytest.mark.parametrize("g,d,P,dtype,identity", [
    (1, 64, 16, F16, False), (3, 128, 32, F32, True), (4, 256, 16, F16, True), (8, 64, 32, F32, False),
])
def test_rotated_decode_with_fp8_pools(g, d, P, dtype, identity):
    """e4m3 codes with per-head scales: rotation and scale compose (the scale folds into the
    logits after the codes are rotated)."""
    case = Case(hkv=3, g=g, d=d, P=P, dtype=dtype, identity=identity, seed=7 * g + d, pool_dtype=FP8)
    out = sparse_decode_attention(*case.args(), num_splits=2, kv_scale=case.kv_scale, rotation=case.rotation)
    ref = reference.sparse_decode_attention(*case.args(), kv_scale=case.kv_scale, rotation=case.rotation)
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(out, case.explicit()) < TOL[dtype]


def test_rotated_decode_with_num_entries():
    case = Case(hkv=2, g=4, d=64, P=16, dtype=F32, identity=False, seed=5, kmax=8)
    n = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    out = sparse_decode_attention(*case.args(), num_entries=n, num_splits=3, rotation=case.rotation)
    ref = reference.sparse_decode_attention(*case.args(), num_entries=n, rotation=case.rotation)
    assert rel_err(out, ref) < TOL[F32]
    assert rel_err(out, case.explicit(num_entries=5)) < TOL[F32]


@pytest.mark.parametrize("dtype,identity", [(F32, False), (F16, True), (BF16, False)])
def test_zero_deltas_give_exactly_the_unrotated_result(dtype, identity):
    """Every page a sink or a local page with shift 0: cos 0 = 1, sin 0 = 0, bit for bit."""
    P = 16
    case = Case(hkv=2, g=3, d=64, P=P, dtype=dtype, identity=identity, seed=3, layout=(4 * P, 4 * P, 0))
    assert window_deltas(case.rotation, P).eq(0).all()
    for fn in (sparse_decode_attention, reference.sparse_decode_attention):
        plain = fn(*case.args())
        rotated = fn(*case.args(), rotation=case.rotation)
        assert torch.equal(rotated, plain), fn.__module__


# -- page-relative abstracts ------------------------------------------------------------------------

def relative_abstracts_direct(k: torch.Tensor, freq: torch.Tensor, P: int, dtype) -> tuple:
    """k (N, Hkv, D) pre-RoPE keys of tokens 0 .. N-1 -> per-page min/max (Hkv, pages, D) of the
    keys rotated by their offsets in their pages (float64 rotation, cast to dtype)."""
    n, hkv, d = k.shape
    offsets = torch.arange(n) % P
    rotated = rope64(k.double(), offsets[:, None, None] * freq.double()).to(dtype).transpose(0, 1)
    pages = -(-n // P)
    pad = pages * P - n
    lo = torch.cat((rotated, torch.full((hkv, pad, d), float("inf"), dtype=dtype)), 1)
    hi = torch.cat((rotated, torch.full((hkv, pad, d), float("-inf"), dtype=dtype)), 1)
    return lo.view(hkv, pages, P, d).amin(2), hi.view(hkv, pages, P, d).amax(2)


@pytest.mark.parametrize("backend,dtype,d,P,pos_dtype", [
    ("triton", F32, 64, 16, torch.int32), ("triton", BF16, 128, 16, torch.int64),
    ("triton", F16, 256, 32, torch.int32), ("torch", F32, 64, 16, torch.int64), ("torch", BF16, 128, 32, torch.int32),
])
def test_relative_abstracts_across_prefill_and_decode(backend, dtype, d, P, pos_dtype):
    """A prefill chunk, single decode tokens (continuing a page, then starting one), a second chunk
    continuing a page: every page's running min/max equals the direct one; junk in pages being
    started is dropped, untouched pages keep theirs."""
    hkv, max_pages = 3, 8
    gen = torch.Generator().manual_seed(d + P)
    freq = inv_freq(d).float()
    a, b, c = 2 * P + 5, 3 * P + 2, 5 * P + 10           # chunk [0, a), decode [a, b), chunk [b, c)
    # Model-dtype keys with a strided head dim (a view of a fused projection).
    k_all = torch.randn(c, hkv, 2 * d, generator=gen).to(dtype)[..., :d]
    junk = torch.randn(2, hkv, max_pages, d, generator=gen).to(dtype)
    kmin, kmax = junk[0].clone().to(DEVICE), junk[1].clone().to(DEVICE)
    k_dev, f_dev = k_all.to(DEVICE), freq.to(DEVICE)
    step = kernel_backend(DEVICE, backend).update_relative_abstract
    assert step is (update_relative_abstract if backend == "triton" else update_relative_abstract_reference)

    def positions(lo, hi):
        return torch.arange(lo, hi, dtype=pos_dtype, device=DEVICE)

    update_relative_abstracts(k_dev[:a], positions(0, a), f_dev, kmin, kmax, P)
    for t in range(a, b):
        step(k_dev[t], f_dev, kmin, kmax, positions(t, t + 1), P)
    update_relative_abstracts(k_dev[b:c], positions(b, c), f_dev, kmin, kmax, P)

    lo, hi = relative_abstracts_direct(k_all, freq, P, dtype)
    n_pages = lo.shape[1]
    # fp32 rotation vs float64: a few ulps in fp32; at most one rounding flip in fp16/bf16.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(kmin[:, :n_pages].cpu(), lo, rtol=eps, atol=8 * eps)
    torch.testing.assert_close(kmax[:, :n_pages].cpu(), hi, rtol=eps, atol=8 * eps)
    assert torch.equal(kmin[:, n_pages:].cpu(), junk[0, :, n_pages:])
    assert torch.equal(kmax[:, n_pages:].cpu(), junk[1, :, n_pages:])


@pytest.mark.parametrize("dtype,d", [(F32, 64), (BF16, 128), (F16, 96)])
def test_update_relative_abstract_kernel_matches_reference(dtype, d):
    """Triton vs torch for single tokens: one starting a page (offset 0), others continuing."""
    hkv, max_pages, P = 4, 6, 32
    gen = torch.Generator().manual_seed(d)
    freq = inv_freq(d, theta=500000.0).float().to(DEVICE)
    kmin = torch.randn(hkv, max_pages, d, generator=gen).to(dtype).to(DEVICE)
    kmax = kmin + 1
    got_min, got_max = kmin.clone(), kmax.clone()
    for pos in (64, 65, 95, 17, 161):
        k = torch.randn(hkv, d, generator=gen).to(dtype).to(DEVICE)
        position = torch.tensor([pos], device=DEVICE)
        update_relative_abstract(k, freq, got_min, got_max, position, P)
        update_relative_abstract_reference(k, freq, kmin, kmax, position, P)
        eps = torch.finfo(dtype).eps  # same fp32 math; cos/sin may differ by an ulp
        torch.testing.assert_close(got_min, kmin, rtol=eps, atol=4 * eps)
        torch.testing.assert_close(got_max, kmax, rtol=eps, atol=4 * eps)


# -- GPU only ----------------------------------------------------------------------------------------

@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rotated_decode_on_cuda_at_a_realistic_shape_and_in_a_cuda_graph():
    """Hkv 8, G 4, D 128, Kmax 65, P 32, bf16: Triton vs reference; then the rotated decode and a
    relative-abstract step captured in a CUDA graph (capture fails on any host sync) and replayed
    with a new layout written into the same device tensor."""
    hkv, g, d, P, max_pages, kmax = 8, 4, 128, 32, 200, 65
    gen = torch.Generator().manual_seed(0)
    k_pool = torch.randn(hkv * max_pages, P, d, generator=gen).to(BF16).cuda()
    v_pool = torch.randn(hkv * max_pages, P, d, generator=gen).to(BF16).cuda()
    pages = torch.stack([torch.randperm(max_pages, generator=gen)[:kmax] for _ in range(hkv)])
    slots = (pages + torch.arange(hkv)[:, None] * max_pages).to(torch.int32).contiguous().cuda()
    lens = torch.full((hkv, kmax), P, dtype=torch.int32)
    lens[:, -1] = 0
    lens = lens.cuda()
    q = torch.randn(hkv * g, d, generator=gen).to(BF16).cuda()
    layout = torch.tensor([64, 180 * P, 100 * P], dtype=torch.int32, device="cuda")
    rotation = KeyRotation(inv_freq(d, 500000.0).float().cuda(), slots, max_pages, layout)
    out = sparse_decode_attention(q, k_pool, v_pool, slots, lens, rotation=rotation)
    assert rel_err(out, reference.sparse_decode_attention(q, k_pool, v_pool, slots, lens, rotation=rotation)) \
        < TOL[BF16]

    kmin = torch.zeros(hkv, max_pages, d, dtype=BF16, device="cuda")
    kmax = torch.zeros_like(kmin)
    k1 = torch.randn(hkv, d, generator=gen).to(BF16).cuda()
    position = torch.tensor([5 * P], device="cuda")
    graph_out = torch.empty_like(out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sparse_decode_attention(q, k_pool, v_pool, slots, lens, rotation=rotation, out=graph_out)
        update_relative_abstract(k1, rotation.inv_freq, kmin, kmax, position, P)
    layout.copy_(torch.tensor([0, 100 * P, 7], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    want = reference.sparse_decode_attention(q, k_pool, v_pool, slots, lens, rotation=rotation)
    assert rel_err(graph_out, want) < TOL[BF16]
    ref_min, ref_max = torch.zeros_like(kmin), torch.zeros_like(kmax)
    update_relative_abstract_reference(k1, rotation.inv_freq, ref_min, ref_max, position, P)
    eps = torch.finfo(BF16).eps
    torch.testing.assert_close(kmin, ref_min, rtol=eps, atol=eps)
    torch.testing.assert_close(kmax, ref_max, rtol=eps, atol=eps)
