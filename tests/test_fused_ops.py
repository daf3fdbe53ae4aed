"""Fused RMSNorm(+residual) and RoPE kernels against their torch references.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (``backend="triton"`` forces
them; ``auto`` would take the torch path on CPU). The interpreter rounds fp32 -> bf16 by
truncation, not to nearest even as the GPU does, so interpreted bf16 results are checked against a
rounding-error bound instead of bit for bit.
"""
import dataclasses
import functools

import pytest
import torch

from lcrun.kernels import fused_norm, fused_rope  # noqa: E402
from lcrun.kernels.fused_norm import rms_norm, rms_norm_reference  # noqa: E402
from lcrun.kernels.fused_rope import fusable, rope_qk, rope_reference, rope_three  # noqa: E402
from lcrun.kernels.triton_support import interpreting  # noqa: E402
from lcrun.runtime import model as model_mod, rope as rope_mod  # noqa: E402
from lcrun.runtime.build import random_model  # noqa: E402
from lcrun.runtime.kv_cache import DenseCache  # noqa: E402
from lcrun.runtime.model_config import ModelConfig  # noqa: E402
from lcrun.runtime.rope import Rotary  # noqa: E402
from lcrun.runtime.synthetic import synthetic_config  # noqa: E402

from triton_env import DEVICE, require_triton  # noqa: E402

require_triton()

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
BF16_TRUNCATES = interpreting()
BF16_ULP = 2.0 ** -7  # relative spacing of bf16 (8 significant bits): bounds one rounding either way


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Float tensors from torch.empty start as NaN, so an element a kernel never writes shows."""
    def poisoned(orig):
        def make(*args, **kwargs):
            t = orig(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return make
    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))


poisoned = pytest.mark.usefixtures("poisoned_empty")


def randn(*shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


# -- rms_norm ------------------------------------------------------------------------------------

def check_norm(out, ref, x_dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape and not out.isnan().any()
    out, ref = out.double(), ref.double()
    if x_dtype == BF16 and BF16_TRUNCATES:
        rtol = 3 * BF16_ULP  # two roundings (x * inv, then * weight), each up to 1 ulp off
    else:
        # The mean of squares is summed in another order than torch's: an fp32 ulp or so, which can
        # tip the rounding to x's dtype by one ulp of that dtype now and then.
        rtol = {F32: 2e-6, F16: 2 * 2.0 ** -10, BF16: 2 * BF16_ULP}[x_dtype]
    assert ((out - ref).abs() <= rtol * ref.abs() + 1e-30).all(), (out - ref).abs().max().item()
    if x_dtype != F32 and not (x_dtype == BF16 and BF16_TRUNCATES):
        assert (out != ref).float().mean() < 0.01  # almost all bit-identical


@poisoned
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("hidden", [576, 960, 4096])
@pytest.mark.parametrize("t", [1, 3, 130])
def test_rms_norm_matches_reference(dtype, hidden, t):
    x = randn(t, hidden, dtype=dtype, seed=hidden + t) * 3
    weight = (torch.rand(hidden, generator=torch.Generator().manual_seed(t)) + 0.5).to(dtype).to(DEVICE)
    check_norm(rms_norm(x, weight, 1e-5, backend="triton"), rms_norm_reference(x, weight, 1e-5), dtype)


@poisoned
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("hidden,t", [(576, 1), (960, 3), (4096, 130)])
def test_rms_norm_with_residual(dtype, hidden, t):
    # Rows of a wider buffer: x and residual need only a contiguous last dim.
    x = randn(t, hidden + 64, dtype=dtype, seed=1)[:, 64:]
    residual = randn(t, hidden, dtype=dtype, seed=2)
    weight = (randn(hidden, dtype=F32, seed=3).abs() + 0.5).to(dtype)
    out, s = rms_norm(x, weight, 1e-6, residual=residual, backend="triton")
    ref, s_ref = rms_norm_reference(x, weight, 1e-6, residual=residual)
    if dtype == BF16 and BF16_TRUNCATES:
        assert ((s.double() - s_ref.double()).abs() <= BF16_ULP * s_ref.double().abs()).all()
    else:
        assert torch.equal(s, s_ref)  # the add rounds as torch's
    check_norm(out, rms_norm_reference(s, weight, 1e-6) if dtype == BF16 and BF16_TRUNCATES else ref, dtype)


@poisoned
def test_rms_norm_fp32_weight_promotes_like_torch():
    x, weight = randn(3, 960, dtype=BF16, seed=4), randn(960, dtype=F32, seed=5)
    out = rms_norm(x, weight, 1e-5, backend="triton")
    assert out.dtype == F32  # weight * bf16 tensor in torch: fp32
    check_norm(out, rms_norm_reference(x, weight, 1e-5), BF16)


def test_rms_norm_dispatch_and_checks():
    x, weight = randn(2, 64, dtype=F32, seed=6), randn(64, dtype=F32, seed=7)
    if DEVICE.type == "cpu":  # auto: the torch reference on CPU, bit for bit
        assert torch.equal(rms_norm(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5))
    assert model_mod.rms_norm is rms_norm  # still importable from the model
    assert rms_norm(x[:0], weight, 1e-5, backend="triton").shape == (0, 64)
    with pytest.raises(AssertionError):
        rms_norm(x.t(), weight, 1e-5, backend="triton")  # last dim not contiguous
    with pytest.raises(AssertionError):
        rms_norm(x, weight, 1e-5, residual=x.half(), backend="triton")


# -- rope ----------------------------------------------------------------------------------------

def cos_sin(t, d, dtype, seed):
    """Rotary.cos_sin's output at scattered large positions (Llama-3 scaling, as for 8B)."""
    cfg = dataclasses.replace(synthetic_config("synthetic:llama-3.1-8b"), head_dim=d)
    positions = torch.randint(0, 200_000, (t,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return Rotary(cfg, DEVICE).cos_sin(positions, dtype)


def fused_qkv(t, hq, hkv, d, dtype, seed):
    """q, k as strided views of one (T, (Hq + 2 Hkv) * D) projection, as the model splits it."""
    qkv = randn(t, (hq + 2 * hkv) * d, dtype=dtype, seed=seed)
    q, k, _ = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)
    return q.view(t, hq, d), k.view(t, hkv, d)


def check_rope(out, x, cos, sin):
    ref = rope_reference(x, cos, sin)
    assert out.dtype == ref.dtype and out.shape == ref.shape and not out.isnan().any()
    if x.dtype == BF16 and BF16_TRUNCATES:
        # Two products and a sum, each rounded: within an ulp of each term's magnitude either way.
        half = x.shape[-1] // 2
        xd, c, s = x.double(), cos.double(), sin.double()
        rotated = torch.cat((-xd[..., half:], xd[..., :half]), dim=-1)
        bound = 2 * BF16_ULP * ((xd * c).abs() + (rotated * s).abs() + ref.double().abs())
        assert ((out.double() - ref.double()).abs() <= bound).all()
    else:
        assert torch.equal(out, ref)  # the same three roundings as torch


@poisoned
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (32, 8, 128), (4, 4, 64), (4, 4, 128)])
@pytest.mark.parametrize("t", [1, 3, 130])
def test_rope_qk_matches_reference(dtype, hq, hkv, d, t):
    q, k = fused_qkv(t, hq, hkv, d, dtype, seed=hq * t)
    assert t == 1 or q.stride(0) == k.stride(0) == (hq + 2 * hkv) * d  # rows of the fused projection
    cos, sin = cos_sin(t, d, dtype, seed=t)
    q_rot, k_rot = rope_qk(q, k, cos, sin, backend="triton")
    check_rope(q_rot, q, cos, sin)
    check_rope(k_rot, k, cos, sin)


@poisoned
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (32, 8, 128), (8, 1, 256)])
@pytest.mark.parametrize("t", [1, 3])
def test_rope_three_places_q_twice_and_k_once(dtype, hq, hkv, d, t):
    """A window decode step's q at c - shift, q at c - shift - S (scoring) and k at c: one launch,
    each output what the reference gives at its own positions."""
    q, k = fused_qkv(t, hq, hkv, d, dtype, seed=hq + t)
    at_q, at_k, at_2 = (cos_sin(t, d, dtype, seed=s) for s in (1, 2, 3))
    q_rot, k_rot, q2_rot = rope_three(q, k, at_q, at_k, at_2, backend="triton")
    check_rope(q_rot, q, *at_q)
    check_rope(k_rot, k, *at_k)
    check_rope(q2_rot, q, *at_2)


@poisoned
def test_rope_single_tensor_and_transposed_view():
    # window_cache rotates a (T, Hkv, D) transpose of its (Hkv, L, D) key buffer.
    keys = randn(3, 40, 64, dtype=F16, seed=8)[:, 5:12].transpose(0, 1)
    cos, sin = cos_sin(7, 64, F16, seed=9)
    out, none = rope_qk(keys, None, cos, sin, backend="triton")
    assert none is None
    check_rope(out, keys, cos, sin)


def test_rope_fallbacks_and_rotary_entry_points(monkeypatch):
    q, k = fused_qkv(5, 4, 2, 64, F32, seed=10)
    cos, sin = cos_sin(5, 64, F32, seed=11)
    # What the caches pass besides the fused case: another dtype, broadcast cos/sin.
    assert fusable(q, cos, sin)
    assert not fusable(q.half(), cos, sin) and not fusable(q, cos[:1], sin[:1])
    assert torch.equal(rope_qk(q, k, cos[:1], sin[:1])[1], rope_reference(k, cos[:1], sin[:1]))
    with pytest.raises(AssertionError):
        rope_qk(q.half(), None, cos, sin, backend="triton")
    # Rotary.apply/apply_qk go through rope_qk: force the kernel and compare.
    monkeypatch.setattr(rope_mod, "rope_qk", functools.partial(rope_qk, backend="triton"))
    q_rot, k_rot = Rotary.apply_qk(q, k, cos, sin)
    assert torch.equal(q_rot, Rotary.apply(q, cos, sin)) and torch.equal(k_rot, Rotary.apply(k, cos, sin))
    check_rope(k_rot, k, cos, sin)


# -- the model with both kernels -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, F16])
def test_model_logits_with_fused_kernels(monkeypatch, dtype):
    """Prefill then decode of a small model, kernels forced, against the torch path."""
    cfg = ModelConfig(arch="llama", vocab_size=256, hidden_size=192, intermediate_size=256, num_layers=2,
                      num_heads=6, num_kv_heads=2, head_dim=32, max_position_embeddings=256)
    model = random_model(cfg, DEVICE, dtype, seed=12)
    for lw in model.layers:  # norms away from 1 so a wrong weight shows
        lw.attn_norm.uniform_(0.5, 1.5)
        lw.mlp_norm.uniform_(0.5, 1.5)
    ids = torch.randint(0, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(13)).to(DEVICE)

    def run():
        cache = DenseCache(cfg, 64, DEVICE, dtype)
        prefill = model.forward(ids[:10], cache, all_logits=True)
        return torch.cat([prefill, model.forward(ids[10:11], cache), model.forward(ids[11:], cache)])

    with monkeypatch.context() as patch:
        patch.setattr(model_mod, "rms_norm", functools.partial(fused_norm.rms_norm, backend="torch"))
        patch.setattr(rope_mod, "rope_qk", functools.partial(fused_rope.rope_qk, backend="torch"))
        expected = run()
    monkeypatch.setattr(model_mod, "rms_norm", functools.partial(fused_norm.rms_norm, backend="triton"))
    monkeypatch.setattr(rope_mod, "rope_qk", functools.partial(fused_rope.rope_qk, backend="triton"))
    got = run()
    assert not got.isnan().any()
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel <= (1e-5 if dtype == F32 else 5e-3), rel
