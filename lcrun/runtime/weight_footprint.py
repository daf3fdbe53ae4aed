"""What a run's weights will weigh on the device, before loading: their format and bytes, for the
planner (memory and the per-token weight read) and ``lcrun plan``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lcrun.kernels.quant.formats import planes_nbytes
from lcrun.kernels.quant.linear import SCRATCH_BYTES
from lcrun.kernels.quant.quantize import WEIGHT_FORMATS, check_shape
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.weight_source import WeightSource


@dataclass(frozen=True)
class WeightFootprint:
    label: str        # "bfloat16", "Q4_0", "Q4_K+Q6_K" (the layers' matrices; norms are always dense)
    nbytes: int       # all weights as held on the device
    read_bytes: int   # what one decode step reads: all but an untied embedding table (one row of it)
    scratch_bytes: int  # prefill's scratch for one dequantized matrix (0 when all are dense)


def matrix_shapes(cfg: ModelConfig) -> list[tuple[str, int, int]]:
    """(HF name, rows, columns) of every weight matrix, embedding and output head included."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes = [("model.embed_tokens.weight", cfg.vocab_size, h)]
    if not cfg.tie_word_embeddings:
        shapes.append(("lm_head.weight", cfg.vocab_size, h))
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        shapes += [(p + "self_attn.q_proj.weight", cfg.num_heads * d, h), (p + "self_attn.k_proj.weight", cfg.num_kv_heads * d, h),
                   (p + "self_attn.v_proj.weight", cfg.num_kv_heads * d, h), (p + "self_attn.o_proj.weight", h, cfg.num_heads * d),
                   (p + "mlp.gate_proj.weight", i, h), (p + "mlp.up_proj.weight", i, h), (p + "mlp.down_proj.weight", h, i)]
    return shapes


def weights_mode(weights: str, device: torch.device) -> str:
    """--weights as a run on ``device`` loads them: ``auto`` on the CPU is bf16 (dense in the
    compute dtype: the CPU has no kernels for quantized blocks, and dequantizing every matrix at
    every step would be slow); elsewhere the setting itself."""
    return "bf16" if weights == "auto" and device.type == "cpu" else weights


def weight_footprint(cfg: ModelConfig, dtype: torch.dtype, weights: str,
                     source: WeightSource | None = None) -> WeightFootprint:
    """The footprint of ``cfg``'s weights loaded with ``weights`` (a weights_mode value) from
    ``source`` (None: synthetic, dense unless quantized by ``weights``)."""
    dtype_bytes = dtype.itemsize
    fmt = WEIGHT_FORMATS.get(weights)
    kinds: dict[str, int] = {}
    total = cfg.num_parameters() * dtype_bytes
    embed_bytes, scratch = 0, 0
    for name, n, k in matrix_shapes(cfg):
        kind = fmt if fmt is not None else (source.block_format(name) if source is not None and weights == "auto"
                                            else None)
        size = n * k * dtype_bytes
        if fmt is not None:  # refused here, before anything is allocated, not at load
            check_shape(fmt, f"{cfg.name or 'the model'}: {name}", n, k)
        if kind is not None:
            size = planes_nbytes(kind, n, k)
            total += size - n * k * dtype_bytes
            scratch = max(scratch, min(n * k * dtype_bytes, SCRATCH_BYTES))
            if name.startswith("model.layers."):
                kinds[kind] = kinds.get(kind, 0) + 1
        if name == "model.embed_tokens.weight" and not cfg.tie_word_embeddings:
            embed_bytes = size - size // n  # one row is read
    dense_name = str(dtype).removeprefix("torch.")
    dense_layers = 7 * cfg.num_layers - sum(kinds.values())
    label = "+".join(sorted(kinds) + ([dense_name] if dense_layers else []))
    return WeightFootprint(label, total, total - embed_bytes, scratch)
