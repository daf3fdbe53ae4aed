"""Assemble a LlamaModel (or GemmaModel) from a WeightSource (real files) or from random weights (synthetic specs)."""
from __future__ import annotations

from typing import Callable

import torch

from lcrun.errors import ModelLoadError
from lcrun.runtime.model import LayerWeights, LlamaModel
from lcrun.runtime.model_gemma import model_class
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.weight_source import WeightSource


def load_model(source: WeightSource, device: torch.device, dtype: torch.dtype,
               progress: Callable[[int, int], None] | None = None) -> LlamaModel:
    """The model's weights on ``device`` in ``dtype``; progress(layers done, layers) after each layer
    (and with 0 before the first)."""
    cfg = source.config
    available = set(source.names())

    def get(name: str, required: bool = True) -> torch.Tensor | None:
        if name not in available:
            if required:
                raise ModelLoadError(f"{source.path}: tensor {name!r} is missing; the model files are incomplete")
            return None
        return source.get(name, dtype)

    def put(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device, non_blocking=False).contiguous()

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
        q, k, v = (get(p + f"self_attn.{n}_proj.weight") for n in "qkv")
        _check_shape(source, p + "self_attn.q_proj.weight", q, (cfg.num_heads * cfg.head_dim, cfg.hidden_size))
        _check_shape(source, p + "self_attn.k_proj.weight", k, (cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size))
        biases = [get(p + f"self_attn.{n}_proj.bias", required=False) for n in "qkv"]
        bqkv = None
        if any(b is not None for b in biases):
            sizes = (q.shape[0], k.shape[0], v.shape[0])
            bqkv = torch.cat([b if b is not None else torch.zeros(n, dtype=dtype) for b, n in zip(biases, sizes)])
        gate, up = get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")
        _check_shape(source, p + "mlp.gate_proj.weight", gate, (cfg.intermediate_size, cfg.hidden_size))
        layers.append(LayerWeights(
            attn_norm=norm(p + "input_layernorm.weight"),
            wqkv=put(torch.cat([q, k, v])),
            bqkv=put(bqkv),
            wo=put(get(p + "self_attn.o_proj.weight")),
            bo=put(get(p + "self_attn.o_proj.bias", required=False)),
            mlp_norm=norm(p + ("pre_feedforward_layernorm.weight" if gemma else "post_attention_layernorm.weight")),
            w_gate_up=put(torch.cat([gate, up])),
            w_down=put(get(p + "mlp.down_proj.weight")),
            q_norm=norm(p + "self_attn.q_norm.weight", required=cfg.qk_norm),
            k_norm=norm(p + "self_attn.k_norm.weight", required=cfg.qk_norm),
            post_attn_norm=norm(p + "post_attention_layernorm.weight") if gemma else None,
            post_mlp_norm=norm(p + "post_feedforward_layernorm.weight") if gemma else None,
        ))
    if progress is not None:
        progress(cfg.num_layers, cfg.num_layers)
    embed = put(get("model.embed_tokens.weight"))
    _check_shape(source, "model.embed_tokens.weight", embed, (cfg.vocab_size, cfg.hidden_size))
    head = get("lm_head.weight", required=not cfg.tie_word_embeddings)
    lm_head = embed if head is None else put(head)
    return model_class(cfg.arch)(cfg, embed, layers, norm("model.norm.weight"), lm_head)


def _check_shape(source: WeightSource, name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != expected:
        raise ModelLoadError(
            f"{source.path}: tensor {name!r} has shape {tuple(t.shape)}, but the config implies {expected}; "
            "the config and weights do not belong together")


def random_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LlamaModel:
    """Random weights of the right shapes, made on the device (seconds even for 8B).
    Small std keeps activations finite through many layers; speed does not depend on values."""
    gen = torch.Generator(device=device).manual_seed(seed)
    std = 0.02

    def rand(*shape: int) -> torch.Tensor:
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
