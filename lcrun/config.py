"""The one settings dataclass behind the CLI, the Python API and report headers.

Each field's metadata carries its CLI help; ``lcrun.cli`` turns the fields into click
options, ``lcrun.LLM`` takes them as keyword arguments, and reports print ``to_header()``.
A config is validated when it is made and never changes after (a variant is
``dataclasses.replace(config, ...)``, validated in turn), so no caller resolves it again.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lcrun.errors import ConfigError
from lcrun.units import parse_bytes, parse_tokens


DEFAULT_PAGE_SIZE = 32  # where no plan chooses (CPU, window positions)
DEFAULT_MAX_NEW_TOKENS = 512  # most tokens per reply, for the CLI and the API alike


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class LcrunConfig:
    model: str | None = _opt(None, "Model: an HF folder, a .gguf file, or synthetic:NAME. Default: the built-in demo model.")
    ctx: str | int = _opt("8k", "Context length in tokens (4096, 32k, 128K, 1M; k = 1024).")
    device: str = _opt("auto", "cuda, cpu, or auto (cuda when available).", choices=["auto", "cuda", "cpu"])
    dtype: str = _opt("auto", "Compute dtype: bfloat16, float16, float32, or auto (bf16 on GPU, fp32 on CPU).",
                      choices=["auto", "bfloat16", "float16", "float32"])
    weights: str = _opt("auto", "How weight matrices are held: auto (as the file stores them: a GGUF's Q8_0/Q4_0/Q4_1/"
                        "Q4_K/Q5_K/Q6_K blocks stay quantized on the GPU; on the CPU, dequantized), bf16 (dequantized "
                        "to the compute dtype), or q8_0/q4_0/q4_k (every matrix quantized on load; synthetic:NAME: "
                        "random weights in that format).", choices=["auto", "bf16", "q8_0", "q4_0", "q4_k"])
    prefill_chunk: int = _opt(2048, "Tokens per prefill chunk.")
    attention: str = _opt("auto", "dense: attend to every cached token; topk: attend to the top-scoring KV pages; "
                          "auto: dense while the whole KV cache fits beside the weights and the plan predicts it no "
                          "slower than top-k, else top-k (always top-k past the model's trained window; on the CPU: "
                          "dense while weights and KV fit the host memory cap).", choices=["auto", "dense", "topk"])
    budget: int = _opt(2048, "topk: tokens attended per KV head per step, sinks and local window included.")
    page_size: int | None = _opt(None, "Tokens per KV page. Default: the planner's choice on a GPU with top-k "
                                 "attention (32 for Llama-3.1-8B until its page abstracts would crowd --gpu-mem), "
                                 "else 32.",
                                 choices=[16, 32, 64, 128])
    sink_tokens: int = _opt(64, "topk: first tokens always attended (inside the budget).")
    window_tokens: int = _opt(512, "topk: last tokens always attended (inside the budget).")
    group_score: str = _opt("max", "topk: combine page scores over a GQA group by max or sum.", choices=["max", "sum"])
    positions: str = _opt("auto", "auto: true positions while the sequence is inside the model's trained window, far "
                          "pages moved inside it past the window; true: never move; window: move from the start.",
                          choices=["auto", "true", "window"])
    prefill: str = _opt("exact", "topk + tiered KV: prefill chunks attend to the whole past (exact) or to sinks, window "
                        "and their top pages within --budget (topk: faster, approximate).", choices=["exact", "topk"])
    prefetch: str = _opt("auto", "tiered KV: prefetch the next layer's pages with a predicted query: from this layer's "
                         "input (hidden, as InfiniGen) or this layer's query (layer); off; or auto: probe hidden on "
                         "the first decode steps and keep it only if enough of what it fetches is used.",
                         choices=["auto", "hidden", "layer", "off"])
    kv_dtype: str = _opt("auto", "tiered KV: how KV pages that leave the GPU are stored (host memory, NVMe and the GPU "
                         "page cache): auto (the compute dtype, exact) or fp8 (e4m3 with per-head scales: half the "
                         "bytes per page, so half the PCIe traffic and twice the cached pages; slightly lossy; needs "
                         "an RTX 40xx/L4/H100-class GPU). A KV cache that fits on the GPU stays in the compute dtype.",
                         choices=["auto", "fp8"])
    gpu_mem: str | None = _opt(None, "Cap on GPU memory lcrun may hold, e.g. 24GiB. Default: the GPU's total memory.")
    host_mem: str | None = _opt(None, "Cap on pinned host memory for the KV cache, e.g. 32GiB.")
    kv_dir: str | None = _opt(None, "Folder for KV pages spilled to disk (NVMe).")
    seed: int = _opt(0, "Random seed for sampling and synthetic weights.")

    # Derived from ctx when the config is made.
    ctx_tokens: int = field(init=False, metadata={"cli": False})

    def unplanned_page_size(self) -> int:
        """The KV page size where no plan chooses one (a CPU run): --page-size, else DEFAULT_PAGE_SIZE."""
        return self.page_size or DEFAULT_PAGE_SIZE

    def __post_init__(self) -> None:
        """Validate every setting, and derive ctx_tokens (a ConfigError names the flag at fault)."""
        object.__setattr__(self, "ctx_tokens", parse_tokens(self.ctx))
        for f in dataclasses.fields(self):  # the Python API gets the CLI's choices checked too
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices is not None and value is not None and value not in choices:
                raise ConfigError(f"--{f.name.replace('_', '-')} must be one of {', '.join(map(str, choices))}, "
                                  f"got {value!r}")
        if self.prefill_chunk < 1:
            raise ConfigError(f"--prefill-chunk must be at least 1, got {self.prefill_chunk}")
        if self.page_size is not None and self.page_size not in (16, 32, 64, 128):
            raise ConfigError(f"--page-size must be 16, 32, 64 or 128, got {self.page_size}")
        if self.positions == "window" and self.attention == "dense":
            raise ConfigError("--positions window needs --attention topk (dense attention attends to every "
                              "token, so there is no window to place them in)")
        if self.attention in ("topk", "auto"):  # auto may pick top-k: its settings must make sense
            if self.budget < self.sink_tokens + self.window_tokens + self.unplanned_page_size():
                raise ConfigError(
                    f"--budget {self.budget} leaves no room for selected pages after {self.sink_tokens} sink and "
                    f"{self.window_tokens} window tokens: raise --budget or lower --sink-tokens/--window-tokens")
        for name in ("gpu_mem", "host_mem"):
            value = getattr(self, name)
            if value is not None:
                parse_bytes(value)

    @property
    def offload_kv_dtype_bytes(self) -> int | None:
        """Bytes per element of tiered KV pages when narrower than the compute dtype (fp8: 1)."""
        return 1 if self.kv_dtype == "fp8" else None

    @property
    def gpu_mem_bytes(self) -> int | None:
        return None if self.gpu_mem is None else parse_bytes(self.gpu_mem)

    @property
    def host_mem_bytes(self) -> int | None:
        return None if self.host_mem is None else parse_bytes(self.host_mem)

    @classmethod
    def cli_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "LcrunConfig":
        names = {f.name for f in cls.cli_fields()}  # the user's settings, not resolved values
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**kwargs)

    def to_header(self) -> dict[str, Any]:
        """The settings as a flat dict, for report and benchmark headers."""
        return dataclasses.asdict(self)
