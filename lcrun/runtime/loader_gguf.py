"""A llama.cpp GGUF file as a WeightSource: config from metadata, tensors under HF Llama names,
and a ``tokenizers`` tokenizer rebuilt from the vocabulary the file carries.

The file is memory-mapped by ``gguf.GGUFReader`` (its header parsed faster, ``_Reader``); ``get``
dequantizes one tensor at a time,
``get_blocks`` keeps a quantized one in its blocks (lcrun.kernels.quant).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, LlamaFileType
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from lcrun.errors import ModelLoadError, UnsupportedModelError
from lcrun.kernels.quant.formats import BY_GGML
from lcrun.kernels.quant.weight import QuantWeight
from lcrun.runtime.chat_template import GEMMA3_CHAT_TEMPLATE, GEMMA3_END_OF_TURN
from lcrun.runtime.model_config import GEMMA3_LOCAL_EVERY, GLOBAL, LOCAL, SUPPORTED_ARCHS, ModelConfig
from lcrun.runtime.rope import rope_inv_freq
from lcrun.runtime.tokenizer import TextTokenizer

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# Gemma 3's four norms per block (llama.cpp names its pre-feedforward norm ffn_norm)
_GEMMA3_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama.cpp's converter reorders q/k rows of these archs for its interleaved rope (Qwen2 it leaves alone)
_PERMUTED_ARCHS = {"llama", "mistral"}
_ALWAYS_DEQUANTIZABLE = {GGMLQuantizationType.F32, GGMLQuantizationType.F16}
_DEQUANT_PIECE = 1 << 22  # elements per piece of a dequantized matrix (16 MiB in fp32)
_REQUIRED = object()

# token_type values of llama.cpp's vocabulary
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

# Split regexes by tokenizer.ggml.pre, as in the models' own tokenizer.json files (and llama.cpp)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = {"default", "gpt-2", "gpt2"}
_DIGITS_PRE = {"smollm", "starcoder"}  # GPT-2 split, but every digit on its own
_LLAMA3_PRE = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe"}
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen"}


class GGUFSource:
    """``GGUFSource(path)``: a WeightSource over one llama.cpp GGUF file (Llama, Mistral, Qwen2/3)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._reader = _open(Path(path))
        self._fields = self._reader.fields
        self.arch = self._meta("general.architecture")
        if self.arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"{self.path}: architecture {self.arch!r} is not supported; "
                f"lcrun runs {', '.join(sorted(SUPPORTED_ARCHS))} GGUF files")
        self._raw = {t.name: t for t in self._reader.tensors}
        self._check_tensors()
        self.config = self._build_config()
        self.stored = f"{self.quantization()} GGUF"
        self._tensors = {}
        block_names = _GEMMA3_BLOCK_NAMES if self.arch == "gemma3" else _BLOCK_NAMES
        for name, t in self._raw.items():
            hf = _hf_name(name, block_names)
            if hf is not None:
                self._tensors[hf] = t
            elif name != "rope_freqs.weight":  # folded into config.rope_scaling
                raise UnsupportedModelError(
                    f"{self.path}: tensor {name!r} has no place in a {self.arch} model lcrun can run; "
                    "use a GGUF converted from a plain Llama/Mistral/Qwen2 checkpoint")

    # -- WeightSource ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._tensors)

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        blocks = self.get_blocks(name)
        if blocks is not None:  # torch's dequantization (gguf's numpy one is slower), in row pieces
            n, k = blocks.shape  # so that its fp32 temporaries stay small beside the result
            out = torch.empty(n, k, dtype=dtype)
            step = max(1, _DEQUANT_PIECE // k)
            for i in range(0, n, step):
                out[i:i + step] = blocks.rows(i, min(n, i + step)).dequantize_reference()
            return out
        w = self._unpermuted(name, self._dequantize(self._tensor(name)))
        if self.arch == "gemma3" and name.endswith("norm.weight"):
            w = w - 1  # llama.cpp's converter stores Gemma's norms as 1 + w; HF checkpoints hold w
        # copy out of the read-only memmap (F32 tensors come back as views of it)
        w = np.ascontiguousarray(w, dtype=np.float32)
        if not w.flags.writeable:
            w = w.copy()
        return torch.from_numpy(w).to(dtype)

    def block_format(self, name: str) -> str | None:
        """The block format ``get_blocks`` keeps ``name`` in ('Q4_K'), or None (stored dense)."""
        t = self._tensor(name)
        fmt = BY_GGML.get(t.tensor_type)
        return None if fmt is None or len(t.shape) != 2 else fmt.name

    def get_blocks(self, name: str) -> QuantWeight | None:
        """A matrix stored in a block format lcrun computes on (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K),
        kept in its blocks (on the CPU); None for other types (F32, F16, BF16 ...: use ``get``)."""
        fmt = self.block_format(name)
        if fmt is None:
            return None
        t = self._tensor(name)
        k, n = (int(d) for d in t.shape)  # gguf lists dims fastest-first
        # the blocks lie along rows, so q/k rows are unpermuted as whole rows of blocks
        raw = self._unpermuted(name, np.asarray(t.data).reshape(n, -1))
        return QuantWeight.from_gguf(fmt, raw, n, k)

    def tokenizer(self) -> TextTokenizer | None:
        kind = self._meta("tokenizer.ggml.model", None)
        if kind is None:
            return None
        tokens = self._meta("tokenizer.ggml.tokens")
        types = self._meta("tokenizer.ggml.token_type", None) or [1] * len(tokens)
        ids = {k: self._meta(f"tokenizer.ggml.{k}_token_id", None) for k in ("bos", "eos", "unknown", "padding", "eot")}
        ids = {k: i for k, i in ids.items() if i is not None and 0 <= i < len(tokens)}
        if kind == "gpt2":
            tok, specials = self._byte_level_bpe(tokens, types)
        elif kind == "llama":
            add_prefix = bool(self._meta("tokenizer.ggml.add_space_prefix", True))
            tok, specials = self._sentencepiece_bpe(tokens, types, ids.get("unknown"), add_prefix)
        else:
            raise UnsupportedModelError(
                f"{self.path}: tokenizer model {kind!r} is not supported (lcrun reads 'gpt2' byte-level BPE "
                "and 'llama' sentencepiece vocabularies); use the model's HF folder with tokenizer.json instead")
        # bos/eos/unk/pad are special to transformers too, whatever type the file gives them
        specials |= {tokens[i] for k, i in ids.items() if k != "eot"}
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                                for s in sorted(specials) if tok.token_to_id(s) is not None])
        # USER_DEFINED tokens (e.g. <think>) are matched whole but kept by decode, as llama.cpp and HF do
        user = [AddedToken(t, special=False, normalized=False)
                for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t not in specials]
        if user:
            tok.add_tokens(user)
        add_bos = bool(self._meta("tokenizer.ggml.add_bos_token", kind == "llama"))  # llama.cpp's default
        add_eos = bool(self._meta("tokenizer.ggml.add_eos_token", False))
        bos = tokens[ids["bos"]] if "bos" in ids else None
        eos = tokens[ids["eos"]] if "eos" in ids else None
        if (add_bos and bos) or (add_eos and eos):
            pre = [bos] if add_bos and bos else []
            post = [eos] if add_eos and eos else []
            single = " ".join(pre + ["$A"] + post)
            pair = " ".join(pre + ["$A"] + post + pre + ["$B:1"] + post)
            tok.post_processor = processors.TemplateProcessing(
                single=single, pair=pair,
                special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys(pre + post)])
        stop = {ids[k] for k in ("eos", "eot") if k in ids}
        template = self._meta("tokenizer.chat_template", None)
        if self.arch == "gemma3":  # its GGUFs carry no template or end-of-turn id: Gemma's own
            template = template or GEMMA3_CHAT_TEMPLATE
            end_of_turn = tok.token_to_id(GEMMA3_END_OF_TURN)
            if end_of_turn is not None:
                stop.add(end_of_turn)
        return TextTokenizer(tok, template, bos, eos, stop, self.path)

    # -- internals -------------------------------------------------------------------------------

    def quantization(self) -> str:
        """The type llama.cpp names the file by (general.file_type: Q4_K_M, Q8_0, ...), else the
        type that holds most of the weights."""
        try:
            kind = LlamaFileType(int(self._meta("general.file_type", -1))).name
        except (TypeError, ValueError):
            kind = "GUESSED"
        if kind != "GUESSED":
            return kind.removeprefix("MOSTLY_").removeprefix("ALL_")
        elements: dict[str, int] = {}
        for t in self._raw.values():
            elements[t.tensor_type.name] = elements.get(t.tensor_type.name, 0) + int(t.n_elements)
        return max(elements, key=elements.get)

    def _tensor(self, name: str):
        t = self._tensors.get(name)
        if t is None:
            raise ModelLoadError(f"{self.path}: has no tensor for {name!r}; the file is incomplete, convert it again")
        return t

    def _unpermuted(self, name: str, rows: np.ndarray) -> np.ndarray:
        """q/k rows (values or rows of blocks) back in HF order for the archs llama.cpp permutes."""
        if self.arch in _PERMUTED_ARCHS and name.startswith("model.layers."):
            if ".q_proj." in name:
                return _unpermute(rows, self.config.num_heads)
            if ".k_proj." in name:
                return _unpermute(rows, self.config.num_kv_heads)
        return rows

    def _meta(self, key: str, default=_REQUIRED):
        field = self._fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise ModelLoadError(
                    f"{self.path}: metadata key {key!r} is missing; convert the model again with a current llama.cpp")
            return default
        return field.contents()

    def _check_tensors(self) -> None:
        size = Path(self.path).stat().st_size
        for t in self._raw.values():
            if t.data_offset + t.n_bytes > size:
                raise ModelLoadError(
                    f"{self.path}: tensor {t.name!r} runs past the end of the file; "
                    "the file is truncated, download or convert it again")
        # refuse an unreadable quantization now, before a caller has loaded gigabytes of other layers
        probed = set(_ALWAYS_DEQUANTIZABLE)
        for t in self._raw.values():
            if t.tensor_type in probed:
                continue
            probed.add(t.tensor_type)
            try:
                self._dequantize(t, probe=True)
            except UnsupportedModelError:
                raise
            except Exception:  # a probe on a partial block may fail in other ways; get() will tell
                pass

    def _dequantize(self, t, probe: bool = False) -> np.ndarray:
        data = t.data
        if probe:  # one block is enough to learn whether the type is implemented
            block_bytes = GGML_QUANT_SIZES[t.tensor_type][1]
            data = np.asarray(data).reshape(-1).view(np.uint8)[:block_bytes]
        try:
            w = dequantize(data, t.tensor_type)
        except NotImplementedError:
            raise UnsupportedModelError(
                f"{self.path}: tensor {t.name!r} is stored as {t.tensor_type.name}, which lcrun cannot dequantize; "
                "use a GGUF quantized as F16, BF16, Q8_0, Q6_K, Q5_K, Q4_K, Q4_0 or Q4_1") from None
        if probe:
            return w
        # gguf lists dims fastest-first (ne order); torch wants them slowest-first, i.e. (out, in)
        return w.reshape(tuple(int(d) for d in reversed(t.shape)))

    def _build_config(self) -> ModelConfig:
        arch = self.arch
        try:
            heads = int(self._meta(f"{arch}.attention.head_count"))
            hidden = int(self._meta(f"{arch}.embedding_length"))
            head_dim = int(self._meta(f"{arch}.attention.key_length", 0)) or hidden // heads
            rope_dims = self._meta(f"{arch}.rope.dimension_count", None)
            if rope_dims is not None and int(rope_dims) != head_dim:
                raise UnsupportedModelError(
                    f"{self.path}: rope covers {rope_dims} of {head_dim} head dimensions; lcrun only runs full rope")
            vocab = self._meta(f"{arch}.vocab_size", None)
            if vocab is None:
                tokens = self._fields.get("tokenizer.ggml.tokens")
                vocab = len(tokens.data) if tokens is not None else int(self._raw["token_embd.weight"].shape[1])
            bos = self._meta("tokenizer.ggml.bos_token_id", None)
            eos_ids = [self._meta(f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot")]
            cfg = ModelConfig(
                arch=arch,
                vocab_size=int(vocab),
                hidden_size=hidden,
                intermediate_size=int(self._meta(f"{arch}.feed_forward_length")),
                num_layers=int(self._meta(f"{arch}.block_count")),
                num_heads=heads,
                num_kv_heads=int(self._meta(f"{arch}.attention.head_count_kv", heads)),
                head_dim=head_dim,
                rms_eps=float(self._meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(self._meta(f"{arch}.rope.freq_base", 10000.0)),
                max_position_embeddings=int(self._meta(f"{arch}.context_length", 4096)),
                tie_word_embeddings="output.weight" not in self._raw,
                attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in self._raw,
                qk_norm="blk.0.attn_q_norm.weight" in self._raw,
                **(self._gemma3_fields(hidden, heads, head_dim) if arch == "gemma3" else {}),
                bos_token_id=None if bos is None else int(bos),
                eos_token_ids=list(dict.fromkeys(int(i) for i in eos_ids if i is not None)),
            )
        except (TypeError, ValueError, KeyError) as exc:
            raise ModelLoadError(
                f"{self.path}: metadata has an unusable value ({exc}); convert the model again") from None
        except ModelLoadError as exc:  # ModelConfig's own checks do not know the file
            if self.path in str(exc):
                raise
            raise type(exc)(f"{self.path}: {exc}") from None
        return dataclasses.replace(cfg, rope_scaling=self._rope_scaling(cfg))

    def _gemma3_fields(self, hidden: int, heads: int, head_dim: int) -> dict:
        """What a Gemma 3 GGUF does not store, as llama.cpp assumes it: every 6th layer global, local
        rope base 10000, and a query scale of 1/sqrt(head_dim) (27B, 62 layers: 1/sqrt(hidden/heads))."""
        layers = int(self._meta("gemma3.block_count"))
        window = self._meta("gemma3.attention.sliding_window", None)
        if window is None:
            raise ModelLoadError(f"{self.path}: metadata key 'gemma3.attention.sliding_window' is missing; "
                                 "convert the model again with a current llama.cpp")
        cap = self._meta("gemma3.final_logit_softcapping", None)
        return dict(layer_types=[LOCAL if (i + 1) % GEMMA3_LOCAL_EVERY else GLOBAL for i in range(layers)],
                    sliding_window=int(window), local_rope_theta=10000.0,
                    query_pre_attn_scalar=float(hidden // heads if layers == 62 else head_dim),
                    final_logit_softcapping=None if cap is None else float(cap))

    def _rope_scaling(self, cfg: ModelConfig) -> dict | None:
        kind = str(self._meta(f"{self.arch}.rope.scaling.type", "none"))
        factor = (self._meta(f"{self.arch}.rope.scaling.factor", None)
                  or self._meta(f"{self.arch}.rope.scale_linear", None))  # the older key
        if "rope_freqs.weight" in self._raw:
            return self._llama3_scaling(cfg)
        if kind == "linear" or (kind == "none" and factor not in (None, 1.0)):
            if factor is None:
                raise ModelLoadError(f"{self.path}: linear rope scaling without a factor; convert the model again")
            return {"rope_type": "linear", "factor": float(factor)}
        if kind != "none":
            raise UnsupportedModelError(
                f"{self.path}: rope scaling {kind!r} is not supported; lcrun implements linear and llama3 scaling")
        return None

    def _llama3_scaling(self, cfg: ModelConfig) -> dict | None:
        # llama.cpp stores Llama 3.1 scaling only as per-frequency divisors (rope_freqs.weight), not its
        # parameters. Accept it when Llama 3's usual parameters reproduce those divisors exactly.
        t = self._raw["rope_freqs.weight"]
        divisors = self._dequantize(t).reshape(-1).astype(np.float64)
        if np.allclose(divisors, 1.0):
            return None
        guess = {"rope_type": "llama3", "factor": float(divisors.max()), "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None)).double().numpy()
        scaled = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=guess)).double().numpy()
        if divisors.shape == plain.shape and np.allclose(plain / divisors, scaled, rtol=1e-4):
            return guess
        raise UnsupportedModelError(
            f"{self.path}: rope frequencies are rescaled by a rope_freqs.weight tensor that does not match "
            "Llama 3 scaling (factor, low 1, high 4, context 8192); use the model's HF folder instead")

    def _byte_level_bpe(self, tokens: list[str], types: list[int]) -> tuple[Tokenizer, set[str]]:
        pre = str(self._meta("tokenizer.ggml.pre", "default"))
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        # some converters store added tokens in plain text; BPE needs every token in the byte alphabet
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
                 for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in self._meta("tokenizer.ggml.merges")]
        tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=pre in _LLAMA3_PRE))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        if pre in _GPT2_PRE:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        elif pre in _DIGITS_PRE:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        elif pre in _LLAMA3_PRE or pre in _QWEN2_PRE:
            split = _LLAMA3_SPLIT if pre in _LLAMA3_PRE else _QWEN2_SPLIT
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
            if pre in _QWEN2_PRE:
                tok.normalizer = normalizers.NFC()  # as Qwen2's tokenizer.json
        else:
            supported = sorted(_GPT2_PRE | _DIGITS_PRE | _LLAMA3_PRE | _QWEN2_PRE)
            raise UnsupportedModelError(
                f"{self.path}: pre-tokenizer {pre!r} is not supported (lcrun knows {', '.join(supported)}); "
                "use the model's HF folder with tokenizer.json instead")
        tok.decoder = decoders.ByteLevel()
        # a CONTROL token outside the byte alphabet is a converter mislabel; HF skips those too
        specials = {t for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet}
        return tok, specials

    def _sentencepiece_bpe(self, tokens: list[str], types: list[int], unk_id: int | None,
                           add_prefix: bool) -> tuple[Tokenizer, set[str]]:
        # sentencepiece BPE as HF's LlamaTokenizer: merges recovered from the scores, byte fallback
        scores = self._meta("tokenizer.ggml.scores")
        vocab = {t: i for i, t in enumerate(tokens)}
        unk = tokens[unk_id] if unk_id is not None else None
        tok = Tokenizer(models.BPE(vocab, _merges_from_scores(vocab, dict(zip(tokens, scores))),
                                   unk_token=unk, fuse_unk=True, byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if add_prefix else "never", split=False)
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if add_prefix else []))
        specials = {t for t, ty in zip(tokens, types) if ty in (_UNKNOWN, _CONTROL)}
        return tok, specials


class _Reader(GGUFReader):
    """gguf's reader with the same fields and tensors, opened ~30x faster: it reads every element of a
    metadata array (49K vocabulary strings, 49K merges) through np.memmap slicing, whose Python-level
    __getitem__/__array_finalize__ took ~5 s for the demo model. Here slices come from a plain ndarray
    view of the same map, and arrays of strings or scalars are read in one loop."""

    @functools.cached_property
    def _plain(self) -> np.ndarray:
        return self.data.view(np.ndarray)

    def _get(self, offset, dtype, count=1, override_order=None):
        count = int(count)
        arr = self._plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        sub = GGUFValueType(itype[0])
        nptype = self.gguf_scalar_to_np.get(sub)
        if sub != GGUFValueType.STRING and nptype is None:  # nested arrays: gguf's own way
            return super()._get_field_parts(orig_offs, raw_type)
        n, offs, parts = int(alen[0]), orig_offs + 12, [itype, alen]
        types = [GGUFValueType.ARRAY] + ([sub] if n else [])
        if sub == GGUFValueType.STRING:  # parts: (length, bytes) per string, as gguf lays them out
            for _ in range(n):
                size = self._plain[offs:offs + 8].view(np.uint64)
                parts += (size, self._plain[offs + 8:offs + 8 + int(size[0])])
                offs += 8 + int(size[0])
            return offs - orig_offs, parts, list(range(3, 2 + 2 * n, 2)), types
        values = self._get(offs, nptype, n)
        parts += [values[i:i + 1] for i in range(n)]
        return 12 + int(values.nbytes), parts, list(range(2, 2 + n)), types


def _open(path: Path) -> GGUFReader:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file; check the path or download the model again")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder; pass the .gguf file itself")
    try:
        return _Reader(path)
    except ValueError as exc:
        if "magic" in str(exc):
            raise ModelLoadError(
                f"{path}: not a GGUF file (it does not start with 'GGUF'); pass a llama.cpp .gguf model") from None
        raise ModelLoadError(
            f"{path}: the GGUF file is truncated or corrupt ({exc}); download or convert it again") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot be read ({exc})") from None
    except Exception as exc:  # the reader trips over corrupt headers in many ways
        raise ModelLoadError(f"{path}: the GGUF file is corrupt ({type(exc).__name__}: {exc}); "
                             "download or convert it again") from None


def _hf_name(name: str, block_names: dict[str, str]) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK_RE.fullmatch(name)
    if m is None or m[2] not in block_names:
        return None
    return f"model.layers.{m[1]}.{block_names[m[2]]}.{m[3]}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation, which was
    ``w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)``: within each head it interleaved
    the two rotate-half halves as (x0, y0, x1, y1, ...) for its GPT-J-style rope."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Sentencepiece stores no merges: every split of a token into two tokens is a merge, ranked by
    the token's score (as transformers' ``generate_merges``, so ties break the same way)."""
    found = []
    for piece, score in scores.items():
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        found.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    found.sort(key=lambda x: (x[2], len(x[0]), len(x[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
