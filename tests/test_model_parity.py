"""lcrun's model computes what transformers computes, on the same weights (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lcrun.runtime.build import load_model  # noqa: E402
from lcrun.runtime.generate import Generator  # noqa: E402
from lcrun.runtime.kv_cache import DenseCache  # noqa: E402
from lcrun.runtime.layer_kind_cache import with_local_ring  # noqa: E402
from lcrun.runtime.loader_hf import HFFolderSource  # noqa: E402
from lcrun.runtime.sampling import SamplingParams  # noqa: E402

SMALL = dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
             num_attention_heads=8, max_position_embeddings=2048, rms_norm_eps=1e-5)

CONFIGS = {
    "llama31": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=4, rope_theta=1e6,
                                              tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=8, rope_theta=1e4,
                                                  sliding_window=None),
    # head_dim 48 != hidden / heads = 16: Qwen 3 sets it apart
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=48, rope_theta=1e6,
                                              tie_word_embeddings=False, attention_bias=False),
    # every 6th layer global, the others a 16-token sliding window (prompts of 203 and 17 + 32 tokens)
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**SMALL, "num_hidden_layers": 7}, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
        sliding_window=16, final_logit_softcapping=30.0, attn_implementation="eager",
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "llama_gqa8_hd64": lambda: transformers.LlamaConfig(
        **{**SMALL, "hidden_size": 512, "num_attention_heads": 8}, num_key_value_heads=1),
}


def dense_cache(cfg, capacity: int):
    """A DenseCache; for Gemma 3 its global layers', beside a ring of the local layers' window."""
    return with_local_ring(cfg, capacity, "cpu", torch.float32, lambda c: DenseCache(c, capacity, "cpu", torch.float32))


def _save_random(kind: str, folder) -> "transformers.PreTrainedModel":
    torch.manual_seed(sum(map(ord, kind)))
    cfg = CONFIGS[kind]()
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # spread the norms away from 1 so a wrong norm shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = _save_random(request.param, folder)
    ours = load_model(HFFolderSource(folder), torch.device("cpu"), torch.float32)
    return ref, ours


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_logits_match_transformers(pair):
    ref, ours = pair
    torch.manual_seed(0)
    ids = torch.randint(0, ours.cfg.vocab_size, (203,))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0].float()
    cache = dense_cache(ours.cfg, 256)
    # two chunks, so attention over cached keys with a causal offset is covered too
    got = torch.cat([ours.forward(ids[:120], cache, all_logits=True),
                     ours.forward(ids[120:], cache, all_logits=True)])
    assert got.shape == expected.shape
    assert _rel_err(got, expected) <= 1e-3
    assert (got - expected).abs().max() / expected.abs().max() <= 1e-3


def test_greedy_32_tokens_match_transformers(pair):
    ref, ours = pair
    prompt = torch.randint(0, ours.cfg.vocab_size, (17,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ref.generate(prompt[None], max_new_tokens=32, do_sample=False, min_new_tokens=32,
                           pad_token_id=0, eos_token_id=None)
    expected = out[0, prompt.numel():].tolist()
    gen = Generator(ours, dense_cache(ours.cfg, 128), prefill_chunk=8)
    got = list(gen.stream(prompt.tolist(), SamplingParams(max_new_tokens=32)))
    assert got == expected
