"""Shape and hyper-parameters of a Llama-family decoder, read from HF config.json or GGUF metadata."""
from __future__ import annotations

from dataclasses import dataclass, field, asdict
from typing import Any

from lcrun.errors import ModelLoadError, UnsupportedModelError

# model_type -> whether q/k/v projections carry a bias by default
SUPPORTED_ARCHS = {"llama": False, "mistral": False, "qwen2": True, "qwen3": False}
HF_ARCH_TO_TYPE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
QK_NORM_ARCHS = {"qwen3"}  # RMSNorm over each head's q and k before RoPE
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
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = ""

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"architecture {self.arch!r} is not supported; lcrun runs {', '.join(sorted(SUPPORTED_ARCHS))}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"{self.num_heads} attention heads do not divide into {self.num_kv_heads} KV heads")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in SUPPORTED_ROPE:
            raise UnsupportedModelError(
                f"rope scaling {kind!r} is not supported; lcrun implements {', '.join(SUPPORTED_ROPE)}")

    @property
    def gqa_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def num_parameters(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * h * i + 2 * h + (2 * d if self.qk_norm else 0)
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from the dict of an HF config.json; ``source`` names the file in errors."""
        arch = cfg.get("model_type")
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
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
                name=str(cfg.get("_name_or_path", "")),
            )
        except KeyError as exc:
            raise ModelLoadError(f"{source}: required field {exc.args[0]!r} is missing") from None
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{source}: a field has an unusable value ({exc})") from None
