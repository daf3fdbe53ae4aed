"""What every model format offers the runtime: a config, tensors by HF name, and a tokenizer."""
from __future__ import annotations

from typing import Protocol

import torch

from lcrun.kernels.quant.weight import QuantWeight
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.tokenizer import TextTokenizer


class WeightSource(Protocol):
    """Tensors are named as in HF Llama checkpoints (``model.layers.0.self_attn.q_proj.weight``,
    ``model.embed_tokens.weight``, ``model.norm.weight``, ``lm_head.weight``), shaped as in
    ``torch.nn.Linear`` ((out_features, in_features)) and returned on the CPU in the asked dtype.
    Each call reads one tensor, so a large model never sits in RAM whole. ``config.name`` is set by
    lcrun.runtime.loading.open_source, which knows what the user passed."""

    config: ModelConfig
    path: str
    stored: str  # how the weights are stored, for people: "Q4_1 GGUF", "bf16 safetensors"

    def names(self) -> list[str]: ...

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor: ...

    def block_format(self, name: str) -> str | None:
        """The block format (lcrun.kernels.quant.formats.FORMATS) ``get_blocks`` returns ``name`` in,
        or None when it is stored dense."""
        ...

    def get_blocks(self, name: str) -> QuantWeight | None:
        """The matrix ``name`` in the quantized blocks it is stored in, on the CPU, or None when
        the source stores it dense (then ``get`` it)."""
        ...

    def tokenizer(self) -> TextTokenizer | None: ...
