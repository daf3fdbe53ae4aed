"""Chunk attention merged by log-sum-exp (prefill over a long past) equals one masked softmax."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lcrun.kernels.attention_lse import RunningAttention, attention_with_lse
from lcrun.runtime.kv_cache import _chunk_attention


@pytest.mark.parametrize("start", [0, 1, 19, 64])
@pytest.mark.parametrize("g", [1, 3, 4])
def test_chunk_attention_equals_masked_sdpa(start, g):
    torch.manual_seed(start + g)
    hkv, d, t = 2, 16, 7
    q = torch.randn(t, hkv * g, d)
    keys, values = torch.randn(hkv, start + t, d), torch.randn(hkv, start + t, d)
    got = _chunk_attention(q, keys, values, start, g, d ** -0.5)
    mask = torch.arange(start + t)[None, :] <= torch.arange(t)[:, None] + start
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), keys.repeat_interleave(g, 0),
                                         values.repeat_interleave(g, 0), attn_mask=mask).transpose(0, 1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_running_attention_over_blocks():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 5, 8), torch.randn(3, 40, 8), torch.randn(3, 40, 8)
    acc = RunningAttention(*attention_with_lse(q, k[:, :7], v[:, :7], False, 0.3))
    for a, b in ((7, 20), (20, 40)):
        acc.add(*attention_with_lse(q, k[:, a:b], v[:, a:b], False, 0.3))
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(acc.result(q.dtype), ref, rtol=1e-5, atol=1e-5)
