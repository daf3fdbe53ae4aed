"""Shape and hyper-parameters of a Llama-family decoder, read from HF config.json or GGUF metadata."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lcrun.errors import ModelLoadError, UnsupportedModelError
from lcrun.units import format_count

# model_type -> whether q/k/v projections carry a bias by default
SUPPORTED_ARCHS = {"llama": False, "mistral": False, "qwen2": True, "qwen3": False, "gemma3": False}
HF_ARCH_TO_TYPE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}
HF_MODEL_TYPES = {"gemma3_text": "gemma3"}  # config.json model_type -> arch, where they differ
QK_NORM_ARCHS = {"qwen3", "gemma3"}  # RMSNorm over each head's q and k before RoPE
# transformers' Gemma3TextConfig defaults (the 4B's values)
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262208, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                            rms_norm_eps=1e-6, max_position_embeddings=131072, query_pre_attn_scalar=256,
                            sliding_window=4096, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
                            hidden_activation="gelu_pytorch_tanh")
LOCAL, GLOBAL = "sliding_attention", "full_attention"  # layer kinds (HF layer_types spelling)
GEMMA3_LOCAL_EVERY = 6  # Gemma 3: every 6th layer is global, the 5 before it local (sliding window)
SUPPORTED_ROPE = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096  # the trained context window
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen 3, Gemma 3)
    # Gemma 3. layer_types: LOCAL or GLOBAL per layer, None: all GLOBAL. LOCAL layers attend to the
    # last ``sliding_window`` tokens only, with rope base ``local_rope_theta`` and no rope scaling;
    # GLOBAL layers use rope_theta and rope_scaling.
    layer_types: list[str] | None = None
    local_rope_theta: float | None = None
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this); None: 1/sqrt(head_dim)
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = ""  # how plans and reports name the model (named()); not the file's internal name

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"architecture {self.arch!r} is not supported; lcrun runs {', '.join(sorted(SUPPORTED_ARCHS))}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"{self.num_heads} attention heads do not divide into {self.num_kv_heads} KV heads")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= {LOCAL, GLOBAL}:
                raise ModelLoadError(f"layer_types must name {LOCAL!r} or {GLOBAL!r} for each of the "
                                     f"{self.num_layers} layers")
            if LOCAL in self.layer_types and not (self.sliding_window and self.local_rope_theta):
                raise ModelLoadError("local (sliding window) layers need sliding_window and local_rope_theta")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in SUPPORTED_ROPE:
            raise UnsupportedModelError(
                f"rope scaling {kind!r} is not supported; lcrun implements {', '.join(SUPPORTED_ROPE)}")

    @property
    def gqa_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def local_layers(self) -> list[int]:
        """Indices of the sliding-window layers (they keep only their window of K/V)."""
        return [i for i, kind in enumerate(self.layer_types or ()) if kind == LOCAL]

    @property
    def global_layers(self) -> list[int]:
        """Indices of the layers that attend to the whole context."""
        local = set(self.local_layers)
        return [i for i in range(self.num_layers) if i not in local]

    def local_view(self) -> "ModelConfig":
        """The config a cache of the local layers only is built for: their count, their rope."""
        return replace(self, num_layers=len(self.local_layers), layer_types=None,
                                   rope_theta=self.local_rope_theta, rope_scaling=None)

    def global_view(self) -> "ModelConfig":
        """The config a cache of the global layers only is built for (dense, paged or tiered)."""
        return replace(self, num_layers=len(self.global_layers), layer_types=None, sliding_window=None)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV bytes each context token adds: global layers only (local layers keep a fixed window)."""
        return 2 * len(self.global_layers) * self.num_kv_heads * self.head_dim * dtype_bytes

    def local_kv_bytes(self, dtype_bytes: int = 2) -> int:
        """The fixed KV bytes of the local layers' windows, whatever the context."""
        return 2 * len(self.local_layers) * self.num_kv_heads * self.head_dim * dtype_bytes * (self.sliding_window or 0)

    def num_parameters(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        norms = 4 * h if self.arch == "gemma3" else 2 * h  # Gemma 3: pre and post norms
        per_layer = attn + 3 * h * i + norms + (2 * d if self.qk_norm else 0)
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h

    def named(self, shown: str, stored: str) -> "ModelConfig":
        """This config named ``shown`` (what the user passed) with its architecture, size and
        storage, e.g. ``SmolLM2-135M-Instruct (llama, 135M params, Q4_1 GGUF)``."""
        return replace(self, name=f"{shown} ({self.arch}, {format_count(self.num_parameters())} params, {stored})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from the dict of an HF config.json; ``source`` names the file in errors."""
        if isinstance(cfg.get("text_config"), dict):
            if cfg.get("model_type") != "gemma3":
                raise UnsupportedModelError(f"{source}: a multimodal checkpoint ({cfg.get('model_type')}) is not "
                                            "supported; lcrun runs text models (and Gemma 3's text part)")
            # Gemma 3 4B/12B/27B are image-text checkpoints: lcrun runs their text model
            cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
        arch = cfg.get("model_type")
        arch = HF_MODEL_TYPES.get(arch, arch)
        if arch == "gemma3":  # Gemma's config.json files leave out what equals transformers' defaults
            cfg = {**GEMMA3_TEXT_DEFAULTS, **cfg}
        if arch is None:
            archs = cfg.get("architectures") or []
            arch = next((HF_ARCH_TO_TYPE[a] for a in archs if a in HF_ARCH_TO_TYPE), None)
            if arch is None:
                raise UnsupportedModelError(f"{source}: architecture {archs or 'unknown'} is not supported")
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"{source}: architecture {arch!r} is not supported; lcrun runs {', '.join(sorted(SUPPORTED_ARCHS))}")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            eos = cfg.get("eos_token_id")
            rope_scaling = cfg.get("rope_scaling") or None
            rope_theta = cfg.get("rope_theta")
            if rope_scaling is None and isinstance(cfg.get("rope_parameters"), dict):
                # transformers 5 style: rope_parameters carries theta and the scaling type
                params = dict(cfg["rope_parameters"])
                rope_theta = params.pop("rope_theta", rope_theta)
                if params.get("rope_type", "default") != "default":
                    rope_scaling = params
            gemma = _gemma3_fields(cfg, source) if arch == "gemma3" else {}
            if gemma:
                rope_theta, rope_scaling = gemma.pop("rope_theta"), gemma.pop("rope_scaling")
            if rope_scaling is not None:
                rope_scaling = dict(rope_scaling)
                rope_scaling.setdefault("rope_type", rope_scaling.get("type", "default"))
            return cls(
                arch=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
                rope_scaling=rope_scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", SUPPORTED_ARCHS[arch])),
                qk_norm=arch in QK_NORM_ARCHS,
                sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
                **gemma,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            )
        except KeyError as exc:
            raise ModelLoadError(f"{source}: required field {exc.args[0]!r} is missing") from None
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{source}: a field has an unusable value ({exc})") from None


def _gemma3_fields(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """Gemma 3's extra fields from its config.json (transformers 4 and 5 spellings): the layer
    pattern, the local and global rope, the query scale and the final logit cap."""
    if cfg.get("hidden_activation", cfg.get("hidden_act", "gelu_pytorch_tanh")) != "gelu_pytorch_tanh":
        raise UnsupportedModelError(f"{source}: Gemma 3 with activation {cfg.get('hidden_activation')!r}; "
                                    "lcrun runs gelu_pytorch_tanh")
    if cfg.get("attn_logit_softcapping") is not None:
        raise UnsupportedModelError(f"{source}: attention logit softcapping is not supported")
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{source}: bidirectional attention (an embedding model) is not supported")
    layers = int(cfg["num_hidden_layers"])
    every = int(cfg.get("sliding_window_pattern", GEMMA3_LOCAL_EVERY))
    types = cfg.get("layer_types") or [LOCAL if (i + 1) % every else GLOBAL for i in range(layers)]
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and GLOBAL in params:  # transformers 5: one dict per layer kind
        glob, loc = dict(params[GLOBAL]), dict(params.get(LOCAL) or {})
        theta, local_theta = glob.pop("rope_theta", 1e6), loc.get("rope_theta", 1e4)
        if loc.get("rope_type", "default") != "default":
            raise UnsupportedModelError(f"{source}: rope scaling on local layers is not supported")
        scaling = glob if glob.get("rope_type", "default") != "default" else None
    else:
        theta, local_theta = cfg.get("rope_theta", 1e6), cfg.get("rope_local_base_freq", 1e4)
        scaling = cfg.get("rope_scaling") or None
    return dict(rope_theta=float(theta), rope_scaling=scaling, layer_types=list(types),
                local_rope_theta=float(local_theta),
                query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", cfg["head_dim"])),
                final_logit_softcapping=cfg.get("final_logit_softcapping"))
