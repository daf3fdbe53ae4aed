"""WindowTopKCache: window positions, sparse prefill and decode, against plain references."""
from __future__ import annotations

import math

import pytest
import torch

from lcrun.runtime.kv_cache import DenseCache
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.rope import Rotary
from lcrun.runtime.window_cache import WindowTopKCache

CFG = ModelConfig(arch="llama", vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=100.0)
P, S, W = 8, 8, 16


def _cache(capacity=256, budget=1 << 12, **kw):
    return WindowTopKCache(CFG, capacity, "cpu", torch.float32, page_size=P, budget=budget, sink_tokens=S,
                           window_tokens=W, **{"select_block": 4, "piece_tokens": 8, **kw})


def _feed(cache, q, k, v, chunks, layer=0):
    """Run q/k/v (T, H, D) through ``cache`` in forwards of the given sizes; outputs (T, Hq, D)."""
    outs, at = [], 0
    for n in chunks:
        cache.begin_forward(torch.arange(cache.length, cache.length + n))
        outs.append(cache.attend(layer, q[at:at + n], k[at:at + n], v[at:at + n]))
        cache.end_forward()
        at += n
    return torch.cat(outs)


def _qkv(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, 4, 16, generator=g), torch.randn(t, 2, 16, generator=g), torch.randn(t, 2, 16, generator=g))


def _reference(q, k, v, piece_starts, far_positions="fixed"):
    """Every earlier token attended (all far pages selected), positions by the module's rules,
    one query at a time with explicit rotation. piece_starts[i]: first token of query i's block.
    far_positions: fixed (all far tokens at S) or paged (far token j at S + j % P)."""
    span = 1 if far_positions == "fixed" else P
    rot = Rotary(CFG, "cpu")
    t = q.shape[0]
    out = torch.empty_like(q)
    for i in range(t):
        c0 = piece_starts[i]
        ls = max(0, (c0 - W) // P * P)
        js = torch.arange(i + 1)
        if ls <= S:
            kpos, qpos = js, i
        else:
            far = S + js % P if far_positions == "paged" else torch.full_like(js, S)
            kpos = torch.where(js < S, js, torch.where(js < ls, far, S + span + js - ls))
            qpos = S + span + i - ls
        qi = rot.rotate(q[i:i + 1], torch.tensor([qpos]))[0]               # (Hq, D)
        keys = rot.rotate(k[: i + 1], kpos)                                # (i+1, Hkv, D)
        for h in range(4):
            kv = h // 2
            w = torch.softmax(keys[:, kv] @ qi[h] / math.sqrt(16), dim=0)
            out[i, h] = w @ v[: i + 1, kv]
    return out


def test_short_context_equals_dense_prefill_and_decode():
    # Within sinks + window every token keeps its true position and everything is attended.
    q, k, v = _qkv(32)
    chunks = [13, 11] + [1] * 8  # decode up to token 31: the local start (page of c0 - W) <= sink end
    dense = _feed(DenseCache(CFG, 64, "cpu", torch.float32), q, k, v, chunks)
    window = _feed(_cache(64), q, k, v, chunks)
    torch.testing.assert_close(window, dense, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("far_positions", ["fixed", "paged"])
@pytest.mark.parametrize("chunks", [[70], [30, 25, 15], [50] + [1] * 20])
def test_window_positions_match_reference_when_every_page_is_selected(chunks, far_positions):
    q, k, v = _qkv(sum(chunks), seed=1)
    starts, at = [], 0
    for n in chunks:  # blocks of piece_tokens=8 from each forward's start; a decode query from c + 1
        starts += [at + 1] if n == 1 else [at + (j // 8) * 8 for j in range(n)]
        at += n
    got = _feed(_cache(far_positions=far_positions), q, k, v, chunks)
    torch.testing.assert_close(got, _reference(q, k, v, starts, far_positions), atol=1e-4, rtol=1e-4)


def test_paged_far_positions_with_one_far_page_equal_ordered():
    # One selected far page: "paged" and "ordered" both put it at positions S .. S+P-1.
    q, k, v = _qkv(120, seed=3)
    paged, ordered = (_feed(_cache(budget=S + W + P, far_positions=fp), q, k, v, [100] + [1] * 20)
                      for fp in ("paged", "ordered"))
    torch.testing.assert_close(paged, ordered, atol=1e-5, rtol=1e-5)
    fixed = _feed(_cache(budget=S + W + P, far_positions="fixed"), q, k, v, [100] + [1] * 20)
    assert not torch.allclose(paged[-20:], fixed[-20:], atol=1e-3)


@pytest.mark.parametrize("chunks", [[70], [30, 25, 15], [50] + [1] * 20])
def test_ordered_far_positions_with_every_page_selected_are_true_positions(chunks):
    # Ordered far pages fill positions S.. in text order: with all of them selected, every token
    # sits at its real position and the result is dense attention.
    q, k, v = _qkv(sum(chunks), seed=2)
    dense = _feed(DenseCache(CFG, 256, "cpu", torch.float32), q, k, v, chunks)
    ordered = _feed(_cache(far_positions="ordered"), q, k, v, chunks)
    torch.testing.assert_close(ordered, dense, atol=1e-4, rtol=1e-4)


def test_ordered_far_positions_keep_text_order_under_a_small_budget():
    q, k, v = _qkv(120, seed=5)
    cache = _cache(budget=S + W + 3 * P, far_positions="ordered")
    _feed(cache, q, k, v, [100] + [1] * 20)
    sel = cache.last_selection
    assert sel.shape == (2, 1, 3)
    assert (sel[..., 1:] > sel[..., :-1]).all()   # sorted: positions follow the text
    ls, sink_end = cache.layout(119)
    assert cache.shift(119) == ls - sink_end - 3 * P


@pytest.mark.parametrize("far_positions", ["fixed", "paged"])
def test_decode_selects_the_page_its_query_points_at(far_positions):
    torch.manual_seed(0)
    t, d = 120, 16
    k = torch.randn(t, 2, d) * 0.1
    v = torch.randn(t, 2, d)
    direction = torch.zeros(d)
    direction[0] = 1.0  # channel 0 pairs with channel 8 under rotation; the query is rotated too
    k[40:48, 1] = direction * 5.0  # page 5 of KV head 1
    q = torch.randn(t, 4, d) * 0.1
    cache = _cache(budget=S + W + P, far_positions=far_positions)  # room for one far page
    _feed(cache, q[:-1], k[:-1], v[:-1], [t - 1])
    # Decode query of group 1 (query heads 2, 3) points at page 5's keys at the far distance
    # (the middle of the far span: scores are exact there).
    qd = torch.zeros(1, 4, d)
    ls, sink_end = cache.layout(t)  # a decode query measures its window from c + 1
    delta = (t - 1 - cache.shift(t)) - sink_end - cache.far_span(1) // 2
    qd[0, 2:] = Rotary(CFG, "cpu").rotate(direction[None, None].expand(1, 2, d), torch.tensor([-delta]))[0] * 5
    _feed(cache, qd, k[-1:], v[-1:], [1])
    assert cache.last_selection.shape == (2, 1, 1)
    assert cache.last_selection[1, 0, 0].item() == 5


def test_prefill_sub_blocks_select_their_own_pages():
    torch.manual_seed(1)
    t, d = 96, 16
    k = torch.randn(t, 2, d) * 0.05
    k[16:24, 0, 3] = 4.0   # page 2
    k[32:40, 0, 5] = 4.0   # page 4
    v = torch.randn(t, 2, d)
    q = torch.randn(t, 4, d) * 0.05
    cache = _cache(budget=S + W + P, piece_tokens=8, select_block=4)
    _feed(cache, q[:88], k[:88], v[:88], [88])
    # Last piece (tokens 88..95): sub-block 0 asks for channel 3, sub-block 1 for channel 5, each
    # query rotated back by its distance to the far position (where the far keys will sit).
    ls, sink_end = cache.layout(88)
    delta = torch.arange(88, 96) - cache.shift(88) - sink_end
    want = torch.zeros(8, 2, 16)
    want[:4, :, 3] = 4.0
    want[4:, :, 5] = 4.0
    q[88:96, :2] = Rotary(CFG, "cpu").rotate(want, -delta)
    _feed(cache, q[88:], k[88:], v[88:], [8])
    assert cache.last_selection[0, :, 0].tolist() == [2, 4]


def test_truncate_then_continue_equals_fresh_run():
    q, k, v = _qkv(90, seed=3)
    fresh = _feed(_cache(budget=S + W + 2 * P), q, k, v, [60, 30])
    cache = _cache(budget=S + W + 2 * P)
    _feed(cache, q[:60], k[:60], v[:60], [60])
    junk = _qkv(15, seed=4)
    _feed(cache, *junk, [15])  # tokens 60..74, then forgotten: page 7 is half rewritten below
    cache.truncate(60)
    again = _feed(cache, q[60:], k[60:], v[60:], [30])
    torch.testing.assert_close(again, fresh[60:], atol=1e-5, rtol=1e-4)


def test_rejects_window_smaller_than_a_page():
    from lcrun.errors import ConfigError
    with pytest.raises(ConfigError, match="window-tokens"):
        WindowTopKCache(CFG, 64, "cpu", torch.float32, page_size=32, window_tokens=16)


def test_last_prompt_token_gets_its_own_selection():
    # Prefill shares a selection per block of queries; the last prompt token, whose logits pick
    # the first answer token, is attended as a decode step would: with its own selection.
    from lcrun.runtime.build import random_model
    from lcrun.runtime.generate import Generator
    model = random_model(CFG, torch.device("cpu"), torch.float32, seed=7)
    ids = torch.randint(0, CFG.vocab_size, (100,), generator=torch.Generator().manual_seed(8)).tolist()

    whole = Generator(model, _cache(budget=S + W + 2 * P), prefill_chunk=32).prefill(ids)
    cache = _cache(budget=S + W + 2 * P)
    for c0 in range(0, 99, 32):  # the prompt but its last token, in the same chunks
        model.forward(torch.tensor(ids[c0:min(c0 + 32, 99)]), cache)
    stepped = model.forward(torch.tensor(ids[-1:]), cache)
    torch.testing.assert_close(whole, stepped.reshape(-1), atol=1e-5, rtol=1e-4)
    shared = _cache(budget=S + W + 2 * P)  # the last token inside the last block instead: differs
    for c0 in range(0, 100, 32):
        blocked = model.forward(torch.tensor(ids[c0:c0 + 32]), shared)
    assert not torch.allclose(whole, blocked[-1], atol=1e-5)
