"""The local Python API: ``from lcrun import LLM``.

    llm = LLM("path/to/model-or.gguf", ctx="128k")
    print(llm.generate("The capital of France is", max_new_tokens=16))
    for piece in llm.chat_stream([{"role": "user", "content": "Hi!"}]):
        print(piece, end="")
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

from lcrun.config import DEFAULT_PAGE_SIZE, LcrunConfig
from lcrun.errors import CapacityError, ConfigError, LcrunError
from lcrun.runtime.build import load_model, random_model
from lcrun.runtime.chat_template import render_chat
from lcrun.runtime.generate import Generator, ProgressFn
from lcrun.runtime.kv_cache import AttentionCache, DenseCache
from lcrun.runtime.loading import default_model, open_source
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.sampling import SamplingParams
from lcrun.runtime.synthetic import is_synthetic, synthetic_config
from lcrun.runtime.tokenizer import StreamDecoder, TextTokenizer
from lcrun.units import format_bytes

TIERED_ALLOCATOR_SLACK = 1 << 30  # bytes of the plan's page slots left unallocated
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is visible: use --device cpu")
    if name == "cuda":  # memory-fraction and property calls need an explicit index
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def plan_memory(config: LcrunConfig, model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """The planner's MemoryPlan for this run on this GPU (None on the CPU or for dense attention)."""
    if device.type != "cuda" or config.attention != "topk":
        return None
    from lcrun.planner import ModelSpec, detect_hardware, make_plan
    elem = torch.tensor([], dtype=dtype).element_size()
    spec = ModelSpec.from_dict(model_cfg.to_dict(), weight_bytes=model_cfg.num_parameters() * elem,
                               kv_dtype_bytes=elem, name=model_cfg.name or str(config.model),
                               offload_kv_dtype_bytes=config.offload_kv_dtype_bytes)
    from lcrun.offload.calibrate import gpu_calibration
    props = torch.cuda.get_device_properties(device)
    hw = detect_hardware(props.name, props.total_memory, gpu_mem=config.gpu_mem, host_mem=config.host_mem,
                         kv_dir=config.kv_dir, calibration=gpu_calibration(device, props.name))
    return make_plan(spec, config.ctx_tokens, hw, page_size=config.page_size, budget_tokens=config.budget,
                     sink_tokens=config.sink_tokens, window_tokens=config.window_tokens,
                     prefill_chunk=config.prefill_chunk, attention="topk")


def resolve_positions(config: LcrunConfig, model_cfg: ModelConfig) -> str:
    """'true' or 'window' for --positions auto|true|window. The trained window is the model's
    max_position_embeddings (GGUF context_length): for llama3-scaled models that is the length
    they were fine-tuned to with the scaling (131072 for Llama 3.1), not the original 8192."""
    if config.positions == "window" and config.attention != "topk":
        raise ConfigError("--positions window needs --attention topk (dense attention attends to every "
                          "token, so there is no window to place them in)")
    if config.positions != "auto":
        return config.positions
    beyond = config.ctx_tokens > model_cfg.max_position_embeddings
    return "window" if beyond and config.attention == "topk" else "true"


def _nvme_slots(plan, kv_dir: str) -> int:
    """Page-file slots: a copy of every page when the disk has room (then evicting a host page
    never writes), else the plan's NVMe pages plus room for pages evicted during decode."""
    import shutil
    try:
        free = shutil.disk_usage(kv_dir).free
    except OSError:
        free = 0
    if plan.total_pages * plan.page_bytes + (2 << 30) <= free:
        return plan.total_pages
    return min(plan.total_pages, plan.nvme_pages + plan.total_pages // 8)


def make_cache(config: LcrunConfig, model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
               plan=None) -> AttentionCache:
    if resolve_positions(config, model_cfg) == "window":
        # Keys kept before RoPE, all on this device (no tiers yet for window positions).
        from lcrun.runtime.window_cache import WindowTopKCache
        return WindowTopKCache(model_cfg, config.ctx_tokens, device, dtype,
                               page_size=config.page_size or DEFAULT_PAGE_SIZE,
                               budget=config.budget, sink_tokens=config.sink_tokens,
                               window_tokens=config.window_tokens, group_score=config.group_score,
                               far_positions=config.far_positions)
    if config.attention == "dense":
        return DenseCache(model_cfg, config.ctx_tokens, device, dtype)
    if plan is not None and not plan.all_on_gpu:
        from lcrun.runtime.tiered_cache import TieredTopKCache
        if plan.abstract_mode == "chunk":
            # The tiered cache keeps every page abstract on the GPU; the plan found they would
            # not fit the cap beside the weights (hierarchical chunk selection runs only when the
            # whole KV cache is on the GPU).
            raise CapacityError(
                f"{plan.ctx_tokens:,} tokens at page size {plan.page_size} need "
                f"{format_bytes(plan.abstract_host_bytes)} of page abstracts, more than the plan can keep on the GPU, "
                "and the tiered KV store does not yet keep them in host memory: use a larger --page-size (up to "
                "128; leave it unset and the planner picks one), a smaller --ctx, or raise --gpu-mem")
        # The plan fills the cap with page slots; keep back room for allocator fragmentation.
        slack_slots = TIERED_ALLOCATOR_SLACK // plan.page_bytes
        layers = model_cfg.num_layers
        tiers = {}
        if plan.nvme_pages:
            # Host pages per layer: the plan's homes plus its staging slots for promoted pages; the
            # staging share is the free reserve the promoter keeps.
            tiers = dict(host_slots_per_layer=(plan.host_pages + plan.host_staging_pages) // layers,
                         promotion_reserve=max(1, plan.host_staging_pages // layers), kv_dir=config.kv_dir,
                         nvme_slots=_nvme_slots(plan, config.kv_dir))
        return TieredTopKCache(model_cfg, config.ctx_tokens, device, dtype,
                               cache_slots_per_layer=max(1, (plan.gpu_slots - slack_slots) // layers),
                               page_size=plan.page_size, budget=config.budget, sink_tokens=config.sink_tokens,
                               window_tokens=config.window_tokens, group_score=config.group_score,
                               prefill_block=plan.prefill_chunk, sparse_prefill=config.prefill == "topk",
                               prefetch=config.prefetch,
                               kv_dtype=torch.float8_e4m3fn if config.kv_dtype == "fp8" else None, **tiers)
    from lcrun.runtime.paged_cache import PagedTopKCache
    # The plan's page size (the one its memory accounting used) when there is a plan.
    page_size = plan.page_size if plan is not None else config.page_size or DEFAULT_PAGE_SIZE
    # Hierarchical selection (chunk abstracts) for long caches, flat below (auto_chunk_pages).
    return PagedTopKCache(model_cfg, config.ctx_tokens, device, dtype, page_size=page_size,
                          budget=config.budget, sink_tokens=config.sink_tokens,
                          window_tokens=config.window_tokens, group_score=config.group_score, chunk_pages="auto")


class LLM:
    """A loaded model with its KV cache, ready to generate. Settings are LcrunConfig's fields."""

    def __init__(self, model: str | None = None, *, config: LcrunConfig | None = None, progress: bool = True,
                 **settings: Any):
        if config is None:
            config = LcrunConfig.from_kwargs(model=model, **settings)
        elif model is not None or settings:
            raise ConfigError("pass either config= or model/settings, not both")
        self.config = config.resolve()
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cuda":
            # The fraction is process-wide: set it every time, so an earlier LLM's cap does not
            # linger on one made without --gpu-mem.
            total = torch.cuda.get_device_properties(self.device).total_memory
            cap = config.gpu_mem_bytes
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total) if cap else 1.0, self.device)
        spec = config.model or default_model()
        self.model_spec = spec
        self.tokenizer: TextTokenizer | None = None
        source = None
        if is_synthetic(spec):
            model_cfg = synthetic_config(spec)
        else:
            source = open_source(spec)
            model_cfg = source.config
        elem = torch.tensor([], dtype=self.dtype).element_size()
        # Check before allocating anything: with top-k attention on a GPU the planner places the
        # KV cache (and says what is short); otherwise weights plus the whole KV must fit the cap.
        self.positions = resolve_positions(config, model_cfg)  # 'true' or 'window': what make_cache builds
        # Window positions keep every page on this device: the tier planner does not apply.
        self.plan = None if self.positions == "window" else plan_memory(config, model_cfg, self.device, self.dtype)
        if self.plan is None:
            self._check_gpu_budget(model_cfg.num_parameters() * elem,
                                   model_cfg.kv_bytes_per_token(elem) * config.ctx_tokens)
        try:
            if source is None:
                self.model = random_model(model_cfg, self.device, self.dtype, seed=config.seed)
            else:
                self.tokenizer = source.tokenizer()
                self.model = load_model(source, self.device, self.dtype, progress=progress)
            self.cache = make_cache(config, self.model.cfg, self.device, self.dtype, self.plan)
        except torch.cuda.OutOfMemoryError as exc:
            raise CapacityError(f"out of GPU memory while loading ({str(exc).splitlines()[0]}): "
                                "lower --ctx or free the GPU") from None
        self.generator = Generator(self.model, self.cache, config.prefill_chunk)

    @property
    def model_config(self) -> ModelConfig:
        return self.model.cfg

    def _check_gpu_budget(self, weight_bytes: int, cache_bytes: int) -> None:
        cap = self.config.gpu_mem_bytes
        if cap is None or self.device.type != "cuda":
            return
        used = weight_bytes + cache_bytes
        if used > cap:
            raise CapacityError(
                f"weights ({format_bytes(weight_bytes)}) and KV cache for {self.config.ctx_tokens} tokens "
                f"({format_bytes(cache_bytes)}) need {format_bytes(used)}, over --gpu-mem "
                f"{format_bytes(cap)} by {format_bytes(used - cap)}: lower --ctx or raise --gpu-mem")

    # -- token level -------------------------------------------------------------------------
    def _need_tokenizer(self) -> TextTokenizer:
        if self.tokenizer is None:
            raise LcrunError(f"{self.model_spec} has no tokenizer (synthetic weights): pass token ids instead")
        return self.tokenizer

    def stream_ids(self, prompt_ids: list[int], progress: ProgressFn | None = None, **sampling: Any) -> Iterator[int]:
        params = SamplingParams(**{"seed": self.config.seed, **sampling})
        stop = self.tokenizer.stop_ids if self.tokenizer else set()
        return self.generator.stream(list(prompt_ids), params, stop, progress)

    def _stream_text(self, ids: list[int], progress: ProgressFn | None, sampling: dict) -> Iterator[str]:
        decoder = StreamDecoder(self._need_tokenizer())
        for token in self.stream_ids(ids, progress, **sampling):
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    # -- text level --------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        tok = self._need_tokenizer()
        text = render_chat(tok.chat_template, messages, add_generation_prompt=True,
                           bos_token=tok.bos_token, eos_token=tok.eos_token)
        return tok.encode(text, add_special_tokens=False)

    def stream(self, prompt: str, progress: ProgressFn | None = None, **sampling: Any) -> Iterator[str]:
        """Plain completion of ``prompt``, yielding text as it forms."""
        return self._stream_text(self._need_tokenizer().encode(prompt), progress, sampling)

    def generate(self, prompt: str, **sampling: Any) -> str:
        return "".join(self.stream(prompt, **sampling))

    def chat_stream(self, messages: list[dict[str, Any]], progress: ProgressFn | None = None,
                    **sampling: Any) -> Iterator[str]:
        """The assistant's next reply to ``messages``, through the model's chat template."""
        return self._stream_text(self.encode_chat(messages), progress, sampling)

    def chat(self, messages: list[dict[str, Any]], **sampling: Any) -> str:
        return "".join(self.chat_stream(messages, **sampling))

    @property
    def last_stats(self):
        return self.generator.last_stats
