"""Assemble a LlamaModel (or GemmaModel) from a WeightSource (real files) or from random weights (synthetic specs).

``weights`` (--weights) picks the matrices' format: auto (as stored: a GGUF's blocks stay
quantized, dense tensors in the compute dtype), bf16 (everything dense in the compute dtype) or
q8_0/q4_0/q4_k (every matrix, embedding and head included, in that format). Norms and biases are
always dense."""
from __future__ import annotations

from typing import Callable

import torch

from lcrun.errors import ModelLoadError
from lcrun.kernels.quant.quantize import WEIGHT_FORMATS, quantize, random_quant
from lcrun.kernels.quant.weight import Weight, cat_rows
from lcrun.runtime.model import LayerWeights, LlamaModel
from lcrun.runtime.model_gemma import model_class
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.weight_source import WeightSource


def load_model(source: WeightSource, device: torch.device, dtype: torch.dtype,
               progress: Callable[[int, int], None] | None = None, weights: str = "bf16") -> LlamaModel:
    """The model's weights on ``device`` in ``dtype``; progress(layers done, layers) after each layer
    (and with 0 before the first). ``weights``: as the module says; harnesses that pass none get
    dense weights (LLM passes the run's --weights, lcrun.runtime.weight_footprint.weights_mode)."""
    cfg = source.config
    available = set(source.names())
    fmt = WEIGHT_FORMATS.get(weights)
    assert fmt is not None or weights in ("auto", "bf16"), weights

    def get(name: str, required: bool = True) -> torch.Tensor | None:
        if name not in available:
            if required:
                raise ModelLoadError(f"{source.path}: tensor {name!r} is missing; the model files are incomplete")
            return None
        return source.get(name, dtype)

    def matrix(name: str, required: bool = True) -> Weight | None:
        """A weight matrix in the run's format (on the CPU)."""
        if name not in available:
            return get(name, required)
        if weights == "auto":
            blocks = source.get_blocks(name)
            if blocks is not None:
                return blocks
        if fmt is not None:
            return quantize(source.get(name, torch.float32), fmt, f"{source.path}: {name}")
        return source.get(name, dtype)

    def put(t: Weight | None) -> Weight | None:
        if t is None:
            return None
        return t.to(device, non_blocking=False).contiguous() if isinstance(t, torch.Tensor) else t.to(device)

    gemma = cfg.arch == "gemma3"

    def norm(name: str, required: bool = True) -> torch.Tensor | None:
        """A norm weight, multiplicative: Gemma's (1 + w) is added here, in fp32."""
        if not gemma or name not in available:
            return put(get(name, required))
        return put((source.get(name, torch.float32) + 1).to(dtype))

    layers = []
    for i in range(cfg.num_layers):
        if progress is not None:
            progress(i, cfg.num_layers)
        p = f"model.layers.{i}."
        q, k, v = (matrix(p + f"self_attn.{n}_proj.weight") for n in "qkv")
        _check_shape(source, p + "self_attn.q_proj.weight", q, (cfg.num_heads * cfg.head_dim, cfg.hidden_size))
        _check_shape(source, p + "self_attn.k_proj.weight", k, (cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size))
        biases = [get(p + f"self_attn.{n}_proj.bias", required=False) for n in "qkv"]
        bqkv = None
        if any(b is not None for b in biases):
            sizes = (q.shape[0], k.shape[0], v.shape[0])
            bqkv = torch.cat([b if b is not None else torch.zeros(n, dtype=dtype) for b, n in zip(biases, sizes)])
        gate, up = matrix(p + "mlp.gate_proj.weight"), matrix(p + "mlp.up_proj.weight")
        _check_shape(source, p + "mlp.gate_proj.weight", gate, (cfg.intermediate_size, cfg.hidden_size))
        layers.append(LayerWeights(
            attn_norm=norm(p + "input_layernorm.weight"),
            wqkv=put(cat_rows([q, k, v])),
            bqkv=put(bqkv),
            wo=put(matrix(p + "self_attn.o_proj.weight")),
            bo=put(get(p + "self_attn.o_proj.bias", required=False)),
            mlp_norm=norm(p + ("pre_feedforward_layernorm.weight" if gemma else "post_attention_layernorm.weight")),
            w_gate_up=put(cat_rows([gate, up])),
            w_down=put(matrix(p + "mlp.down_proj.weight")),
            q_norm=norm(p + "self_attn.q_norm.weight", required=cfg.qk_norm),
            k_norm=norm(p + "self_attn.k_norm.weight", required=cfg.qk_norm),
            post_attn_norm=norm(p + "post_attention_layernorm.weight") if gemma else None,
            post_mlp_norm=norm(p + "post_feedforward_layernorm.weight") if gemma else None,
        ))
    if progress is not None:
        progress(cfg.num_layers, cfg.num_layers)
    embed = put(matrix("model.embed_tokens.weight"))
    _check_shape(source, "model.embed_tokens.weight", embed, (cfg.vocab_size, cfg.hidden_size))
    head = matrix("lm_head.weight", required=not cfg.tie_word_embeddings)
    lm_head = embed if head is None else put(head)
    return model_class(cfg.arch)(cfg, embed, layers, norm("model.norm.weight"), lm_head)


def _check_shape(source: WeightSource, name: str, t: Weight, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != expected:
        raise ModelLoadError(
            f"{source.path}: tensor {name!r} has shape {tuple(t.shape)}, but the config implies {expected}; "
            "the config and weights do not belong together")


def random_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0,
                 weights: str = "auto") -> LlamaModel:
    """Random weights of the right shapes, made on the device (seconds even for 8B); matrices in
    ``weights``' format (auto and bf16: dense in ``dtype``). Small std keeps activations finite
    through many layers; speed does not depend on values."""
    gen = torch.Generator(device=device).manual_seed(seed)
    std = 0.02
    fmt = WEIGHT_FORMATS.get(weights)

    def rand(*shape: int) -> Weight:
        if fmt is not None and len(shape) == 2:
            return random_quant(fmt, *shape, device, gen, std, name=f"{cfg.name} ({shape[0]}x{shape[1]})")
        return (torch.randn(shape, generator=gen, device=device, dtype=dtype) * std)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qkv_rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
    layers = [
        LayerWeights(
            attn_norm=ones(h), wqkv=rand(qkv_rows, h),
            bqkv=rand(qkv_rows) if cfg.attention_bias else None,
            wo=rand(h, cfg.num_heads * d), bo=None, mlp_norm=ones(h),
            w_gate_up=rand(2 * inter, h), w_down=rand(h, inter),
            q_norm=ones(d) if cfg.qk_norm else None, k_norm=ones(d) if cfg.qk_norm else None,
            post_attn_norm=ones(h) if cfg.arch == "gemma3" else None,
            post_mlp_norm=ones(h) if cfg.arch == "gemma3" else None)
        for _ in range(cfg.num_layers)
    ]
    embed = rand(cfg.vocab_size, h)
    lm_head = embed if cfg.tie_word_embeddings else rand(cfg.vocab_size, h)
    return model_class(cfg.arch)(cfg, embed, layers, ones(h), lm_head)
