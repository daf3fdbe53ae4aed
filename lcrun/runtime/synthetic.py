"""Model specs without files (``synthetic:NAME``): real shapes, random weights, for speed work."""
from __future__ import annotations

from lcrun.errors import ModelLoadError
from lcrun.runtime.model_config import GEMMA3_LOCAL_EVERY, GLOBAL, LOCAL, ModelConfig

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}



def _gemma3(layers: int, hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int, qpas: float,
            **kw) -> dict:
    """The text model of google/gemma-3-{4b,12b,27b}-it (config.json, text_config): vocab 262208,
    window 1024, every 6th layer global, rope 1e6 with linear x8 (global) and 1e4 (local), 128K."""
    return dict(dict(arch="gemma3", vocab_size=262208, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                     num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rms_eps=1e-6, rope_theta=1000000.0,
                     rope_scaling={"rope_type": "linear", "factor": 8.0}, max_position_embeddings=131072,
                     tie_word_embeddings=True, sliding_window=1024, qk_norm=True, local_rope_theta=10000.0,
                     layer_types=[LOCAL if (i + 1) % GEMMA3_LOCAL_EVERY else GLOBAL for i in range(layers)],
                     query_pre_attn_scalar=qpas), **kw)


SYNTHETIC_SPECS: dict[str, dict] = {
    "llama-3.1-8b": dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_eps=1e-5,
                         rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072),
    "llama-3.2-3b": dict(arch="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                         num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128, rms_eps=1e-5,
                         rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
                         max_position_embeddings=131072, tie_word_embeddings=True),
    "llama-3.2-1b": dict(arch="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rms_eps=1e-5,
                         rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
                         max_position_embeddings=131072, tie_word_embeddings=True),
    "mistral-7b": dict(arch="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_eps=1e-5,
                       rope_theta=1000000.0, max_position_embeddings=32768),
    "qwen2.5-7b": dict(arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rms_eps=1e-6,
                       rope_theta=1000000.0, max_position_embeddings=32768, attention_bias=True),
    # Qwen/Qwen3-8B config.json
    "qwen3-8b": dict(arch="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rms_eps=1e-6,
                     rope_theta=1000000.0, max_position_embeddings=40960, qk_norm=True),
    # google/gemma-3-270m config.json: vocab 262144, window 512, no rope scaling, 32K
    "gemma-3-270m": _gemma3(18, 640, 2048, 4, 1, 256, 256, vocab_size=262144, sliding_window=512,
                            rope_scaling=None, max_position_embeddings=32768),
    "gemma-3-4b": _gemma3(34, 2560, 10240, 8, 4, 256, 256),
    "gemma-3-12b": _gemma3(48, 3840, 15360, 16, 8, 256, 256),
    "gemma-3-27b": _gemma3(62, 5376, 21504, 32, 16, 128, 168),
    "smollm2-135m": dict(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_eps=1e-5,
                         rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True),
    "tiny": dict(arch="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=4096),
}

PREFIX = "synthetic:"


def is_synthetic(spec: str) -> bool:
    return spec.startswith(PREFIX)


def synthetic_config(spec: str) -> ModelConfig:
    name = spec[len(PREFIX):] if is_synthetic(spec) else spec
    if name not in SYNTHETIC_SPECS:
        raise ModelLoadError(
            f"unknown synthetic model {name!r}; known: {', '.join(PREFIX + n for n in SYNTHETIC_SPECS)}")
    return ModelConfig(**SYNTHETIC_SPECS[name]).named(PREFIX + name, "random weights")
