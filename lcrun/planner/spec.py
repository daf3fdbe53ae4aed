"""The model numbers the planner needs, as plain Python (no torch, no runtime import).

The planner is the bottom layer of lcrun: it must be importable and testable without torch, so it
cannot take ``lcrun.runtime.model_config.ModelConfig``. Callers build a :class:`ModelSpec` from
``ModelConfig.to_dict()`` plus the weight bytes they measured::

    spec = ModelSpec.from_dict(cfg.to_dict(), weight_bytes=model.weight_bytes())
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from lcrun.errors import ConfigError

# HF config.json spellings, so ModelSpec.from_dict also reads a raw config.json dict.
_ALIASES = {
    "num_hidden_layers": "num_layers",
    "num_key_value_heads": "num_kv_heads",
    "num_attention_heads": "num_heads",
    "_name_or_path": "name",
    "max_position_embeddings": "trained_window",
}

# When intermediate_size is unknown the MLP width is taken as 4 * hidden: wider than Llama's 3.5x,
# so the workspace estimate errs on the safe side.
DEFAULT_MLP_RATIO = 4


@dataclass(frozen=True)
class ModelSpec:
    """Shape and size of a decoder as far as memory planning is concerned.

    weight_bytes: bytes of all weights as held on the compute device (after any quantisation).
    weight_format: how the layers' matrices are held ("bfloat16", "Q4_0", "Q4_K+Q6_K"), for display.
    weight_read_bytes: weight bytes one decode step reads (an untied embedding table is not read,
        only one row of it); None: weight_bytes.
    weight_scratch_bytes: prefill scratch for one dequantized weight (quantized weights), else 0.
    kv_dtype_bytes: bytes per KV element (2 for bf16/fp16).
    offload_kv_dtype_bytes: bytes per KV element of pages in the tiered store (host pool, NVMe,
        GPU page cache) when they are stored narrower than on the GPU (1 for fp8); None: kv_dtype_bytes.
    intermediate_size: MLP width; only sizes the prefill workspace (None: 4 * hidden_size).
    kv_layers: layers whose KV grows with the context (Gemma 3: the global layers); None: all.
    local_kv_bytes: the fixed KV of sliding-window layers (a ring of their window each, always on
        the compute device, whatever the context).
    trained_window: the context the model was trained for (``max_position_embeddings``, GGUF
        ``context_length``); None: unknown. Past it, the top-k caches keep a second set of page
        abstracts, and dense attention degrades.
    """

    num_layers: int
    num_kv_heads: int
    num_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    weight_bytes: int
    kv_dtype_bytes: int = 2
    name: str = ""
    dtype: str = ""  # the compute dtype, for people ("fp32", "bf16"); sizes come from the byte counts
    intermediate_size: int | None = None
    offload_kv_dtype_bytes: int | None = None
    trained_window: int | None = None
    weight_format: str = ""
    weight_read_bytes: int | None = None
    weight_scratch_bytes: int = 0
    kv_layers: int | None = None
    local_kv_bytes: int = 0

    def __post_init__(self) -> None:
        for f in ("num_layers", "num_kv_heads", "num_heads", "head_dim", "hidden_size", "vocab_size",
                  "weight_bytes", "kv_dtype_bytes"):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model spec: {f} must be a positive whole number, got {value!r}")
        if self.offload_kv_dtype_bytes is not None and self.offload_kv_dtype_bytes not in (1, 2, 4):
            raise ConfigError(f"model spec: offload_kv_dtype_bytes must be 1, 2 or 4, got {self.offload_kv_dtype_bytes!r}")
        if self.trained_window is not None and (not isinstance(self.trained_window, int)
                                                or isinstance(self.trained_window, bool) or self.trained_window <= 0):
            raise ConfigError(f"model spec: trained_window must be a positive whole number, got {self.trained_window!r}")
        if self.kv_layers is not None and not 0 < self.kv_layers <= self.num_layers:
            raise ConfigError(f"model spec: kv_layers must be within 1..num_layers, got {self.kv_layers!r}")
        if self.local_kv_bytes < 0:
            raise ConfigError(f"model spec: local_kv_bytes must not be negative, got {self.local_kv_bytes!r}")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ConfigError(f"model spec: intermediate_size must be positive, got {self.intermediate_size!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model spec: {self.num_heads} attention heads do not divide into "
                              f"{self.num_kv_heads} KV heads")

    @property
    def decode_weight_bytes(self) -> int:
        return self.weight_bytes if self.weight_read_bytes is None else self.weight_read_bytes

    @property
    def mlp_size(self) -> int:
        return self.intermediate_size or DEFAULT_MLP_RATIO * self.hidden_size

    @property
    def context_layers(self) -> int:
        """Layers with a KV entry per context token (the pages the planner places)."""
        return self.kv_layers or self.num_layers

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over the context layers and KV heads."""
        return 2 * self.context_layers * self.num_kv_heads * self.head_dim * self.kv_dtype_bytes

    @property
    def offload_kv_bytes_per_token(self) -> int:
        """As kv_bytes_per_token, for pages stored in the tiered store."""
        return 2 * self.context_layers * self.num_kv_heads * self.head_dim * (self.offload_kv_dtype_bytes or self.kv_dtype_bytes)

    @property
    def resident_bytes(self) -> int:
        """What sits on the compute device whatever the context: the weights and local windows."""
        return self.weight_bytes + self.local_kv_bytes

    def kv_bytes(self, tokens: int) -> int:
        """The KV cache for ``tokens`` of context, local windows included."""
        return tokens * self.kv_bytes_per_token + self.local_kv_bytes

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], weight_bytes: int | None = None, **overrides: Any) -> "ModelSpec":
        """Build from ``ModelConfig.to_dict()`` (or an HF config.json dict); unknown keys are ignored.

        ``weight_bytes`` (or a ``weight_bytes`` key in ``d``) is required: the planner cannot guess
        how the weights are stored.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in d.items():
            key = _ALIASES.get(key, key)
            if key in fields and value is not None and key not in values:
                values[key] = value
        if "head_dim" not in values and "hidden_size" in values and "num_heads" in values:
            values["head_dim"] = int(values["hidden_size"]) // int(values["num_heads"])
        if "num_kv_heads" not in values and "num_heads" in values:
            values["num_kv_heads"] = values["num_heads"]
        if weight_bytes is not None:
            values["weight_bytes"] = weight_bytes
        values.update(overrides)
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in values)
        if missing:
            raise ConfigError(f"model spec: missing {', '.join(missing)}"
                              + (" (pass weight_bytes=...)" if "weight_bytes" in missing else ""))
        for key in fields - {"name", "dtype", "weight_format"}:
            if key in values and isinstance(values[key], float) and values[key] == int(values[key]):
                values[key] = int(values[key])
        values["name"] = str(values.get("name", ""))
        values["dtype"] = str(values.get("dtype", ""))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
