"""PagedTopKCache against DenseCache and against a float64 Quest oracle, on a tiny random config.

Without CUDA the Triton backend runs in the interpreter (TRITON_INTERPRET is set before any kernel
module is imported); the torch backend is the CPU path users get without it.
"""
import math

import pytest
import torch

from lcrun.errors import ConfigError, ContextOverflowError  # noqa: E402
from triton_env import DEVICE, HAS_TRITON  # noqa: E402
from lcrun.runtime.kv_cache import DenseCache  # noqa: E402
from lcrun.runtime.model_config import ModelConfig  # noqa: E402
from lcrun.runtime.paged_cache import PagedTopKCache  # noqa: E402
from lcrun.runtime.rope import Rotary  # noqa: E402

BACKENDS = ["triton", "torch"] if HAS_TRITON else ["torch"]
CFG = ModelConfig(arch="llama", vocab_size=64, hidden_size=512, intermediate_size=128, num_layers=2,
                  num_heads=8, num_kv_heads=2, head_dim=64, rope_theta=10000.0)


class Tokens:
    """Deterministic q/k/v (pre-RoPE) for every (position, layer), so two caches see the same data."""

    def __init__(self, n: int, seed: int, dtype=torch.float32):
        gen = torch.Generator().manual_seed(seed)
        hq, hkv, d, layers = CFG.num_heads, CFG.num_kv_heads, CFG.head_dim, CFG.num_layers
        self.q = torch.randn(layers, n, hq, d, generator=gen).to(dtype).to(DEVICE)
        self.k = torch.randn(layers, n, hkv, d, generator=gen).to(dtype).to(DEVICE)
        self.v = torch.randn(layers, n, hkv, d, generator=gen).to(dtype).to(DEVICE)


def forward(cache, tokens: Tokens, n: int) -> list[torch.Tensor]:
    """Feed the next ``n`` tokens (from position cache.length) to every layer; per-layer outputs."""
    start = cache.length
    cache.begin_forward(torch.arange(start, start + n, device=DEVICE))
    outs = [cache.attend(layer, tokens.q[layer, start:start + n], tokens.k[layer, start:start + n],
                         tokens.v[layer, start:start + n]) for layer in range(CFG.num_layers)]
    cache.end_forward()
    return outs


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_both(paged, dense, tokens, steps):
    """Run ``steps`` (chunk sizes; 1 = decode) through both caches; pairs of per-layer outputs."""
    pairs = []
    for n in steps:
        pairs.append((n, forward(paged, tokens, n), forward(dense, tokens, n)))
    return pairs


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_dense_while_the_context_fits_the_budget(backend):
    tokens = Tokens(128, seed=1)
    paged = PagedTopKCache(CFG, 128, DEVICE, torch.float32, page_size=16, budget=128, sink_tokens=16,
                           window_tokens=32, backend=backend)
    dense = DenseCache(CFG, 128, DEVICE, torch.float32)
    for n, outs, refs in run_both(paged, dense, tokens, [37, 50, 13] + [1] * 6 + [3] + [1] * 3):
        for out, ref in zip(outs, refs):
            assert out.shape == ref.shape == (n, CFG.num_heads, CFG.head_dim)
            assert rel_err(out, ref) < 1e-5
    assert paged.length == dense.length == 112


def test_equals_dense_in_bf16_with_page_32():
    backend = BACKENDS[0]
    tokens = Tokens(160, seed=2, dtype=torch.bfloat16)
    paged = PagedTopKCache(CFG, 160, DEVICE, torch.bfloat16, page_size=32, budget=160, sink_tokens=32,
                           window_tokens=64, backend=backend)
    dense = DenseCache(CFG, 160, DEVICE, torch.bfloat16)
    for n, outs, refs in run_both(paged, dense, tokens, [70, 60] + [1] * 4):
        for out, ref in zip(outs, refs):
            assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 2e-2


def quest_oracle(q_rot, keys, values, P, S, W, B, reduce):
    """Float64 Quest decode for one token: q_rot (Hq, D); keys/values (Hkv, L, D) post-RoPE."""
    hkv, L, d = keys.shape
    g = q_rot.shape[0] // hkv
    n_pages, n_full = -(-L // P), L // P
    sinks = set(range(min(-(-S // P), n_pages)))
    window = set(range(min(max(L - W, 0) // P, n_pages - 1), n_pages))
    forced = sinks | window
    forced_tokens = sum(min(P, L - p * P) for p in forced)
    out = torch.empty(q_rot.shape, dtype=torch.float64)
    for h in range(hkv):
        qs = q_rot[h * g:(h + 1) * g].double()
        pages = keys[h, : n_full * P].double().reshape(n_full, P, d)
        low, high = pages.amin(1), pages.amax(1)
        bound = torch.maximum(qs[:, None] * low, qs[:, None] * high).sum(-1)  # (G, n_full)
        score = bound.amax(0) if reduce == "max" else bound.sum(0)
        candidates = sorted((p for p in range(n_full) if p not in forced), key=lambda p: -score[p].item())
        chosen = forced | set(candidates[: max(B - forced_tokens, 0) // P])
        idx = torch.tensor([t for p in sorted(chosen) for t in range(p * P, min(L, p * P + P))])
        k, v = keys[h, idx].double(), values[h, idx].double()
        probs = torch.softmax(qs @ k.T / math.sqrt(d), dim=-1)
        out[h * g:(h + 1) * g] = probs @ v
    return out


@pytest.mark.parametrize("backend,reduce", [(b, r) for b in BACKENDS for r in ("max", "sum")])
def test_small_budget_matches_the_quest_oracle_and_differs_from_dense(backend, reduce):
    P, S, W, B = 16, 16, 16, 64
    tokens = Tokens(200, seed=3)
    paged = PagedTopKCache(CFG, 200, DEVICE, torch.float32, page_size=P, budget=B, sink_tokens=S,
                           window_tokens=W, group_score=reduce, backend=backend)
    dense = DenseCache(CFG, 200, DEVICE, torch.float32)
    run_both(paged, dense, tokens, [100, 45])
    differs = False
    for _ in range(5):
        L = dense.length + 1
        outs, refs = forward(paged, tokens, 1), forward(dense, tokens, 1)
        cos, sin = dense.rotary.cos_sin(torch.tensor([L - 1], device=DEVICE), torch.float32)
        for layer in range(CFG.num_layers):
            q_rot = Rotary.apply(tokens.q[layer, L - 1:L], cos, sin)[0]
            expected = quest_oracle(q_rot.cpu(), dense.k[layer, :, :L].cpu(), dense.v[layer, :, :L].cpu(),
                                    P, S, W, B, reduce)
            out = outs[layer][0]
            assert torch.isfinite(out).all()
            assert rel_err(out.cpu(), expected) < 1e-5
            differs |= rel_err(out, refs[layer][0]) > 1e-3
    assert differs, "a 64-token budget over ~150 tokens should change the output"
    for n, outs, refs in run_both(paged, dense, tokens, [20]):  # prefill stays exact
        for out, ref in zip(outs, refs):
            assert rel_err(out, ref) < 1e-5


def test_backends_agree_with_a_small_budget():
    if len(BACKENDS) < 2:
        pytest.skip("Triton cannot run here")
    tokens = Tokens(150, seed=4)
    caches = [PagedTopKCache(CFG, 150, DEVICE, torch.float32, page_size=16, budget=64, sink_tokens=16,
                             window_tokens=16, backend=b) for b in BACKENDS]
    for n in [60, 41, 1, 1, 1, 1]:
        a, b = (forward(c, tokens, n) for c in caches)
        for x, y in zip(a, b):
            assert rel_err(x, y) < 1e-5


def test_truncate_leaves_no_stale_state():
    """Decoding after truncate + re-prefill equals a cache that only ever saw the kept tokens."""
    backend = BACKENDS[0]
    kept = Tokens(150, seed=5)
    junk = Tokens(150, seed=6)
    junk.q[:, :50], junk.k[:, :50], junk.v[:, :50] = kept.q[:, :50], kept.k[:, :50], kept.v[:, :50]
    settings = dict(page_size=16, budget=64, sink_tokens=16, window_tokens=16, backend=backend)
    edited = PagedTopKCache(CFG, 150, DEVICE, torch.float32, **settings)
    fresh = PagedTopKCache(CFG, 150, DEVICE, torch.float32, **settings)
    for n in [90, 1, 1, 1]:
        forward(edited, junk, n)
    edited.truncate(50)
    assert edited.length == 50
    forward(fresh, kept, 50)
    for n in [43, 1, 1, 1, 1]:
        for x, y in zip(forward(edited, kept, n), forward(fresh, kept, n)):
            assert torch.allclose(x, y, atol=1e-6, rtol=1e-5)


def test_dense_layers_attend_to_every_page():
    backend = BACKENDS[0]
    tokens = Tokens(150, seed=7)
    paged = PagedTopKCache(CFG, 150, DEVICE, torch.float32, page_size=16, budget=64, sink_tokens=16,
                           window_tokens=16, dense_layers=1, backend=backend)
    dense = DenseCache(CFG, 150, DEVICE, torch.float32)
    run_both(paged, dense, tokens, [120])
    for _ in range(3):
        outs, refs = forward(paged, tokens, 1), forward(dense, tokens, 1)
        assert rel_err(outs[0], refs[0]) < 1e-5  # dense layer
        assert rel_err(outs[1], refs[1]) > 1e-3  # top-k layer


def test_memory_settings_and_overflow():
    paged = PagedTopKCache(CFG, 100, DEVICE, torch.float16, page_size=32, budget=64, sink_tokens=0,
                           window_tokens=0, backend=BACKENDS[-1])
    layers, hkv, d, pages = CFG.num_layers, CFG.num_kv_heads, CFG.head_dim, 4  # ceil(100 / 32)
    pools = 2 * layers * hkv * pages * 32 * d * 2
    abstracts = 2 * layers * hkv * pages * d * 2
    table = layers * hkv * pages * 4
    assert paged.memory_bytes() == pools + abstracts + table
    with pytest.raises(ContextOverflowError):
        paged.begin_forward(torch.arange(101, device=DEVICE))
    with pytest.raises(ConfigError):
        PagedTopKCache(CFG, 100, DEVICE, torch.float16, page_size=24)
    with pytest.raises(ConfigError):
        PagedTopKCache(CFG, 100, DEVICE, torch.float16, page_size=32, budget=16)
