"""Construction, the one place runs are built: spec -> config -> plan -> cache. Shared by LLM
(lcrun.api), the CLI, bench, eval, profile and serve, so each builds a run the same way: the device
and dtype resolved, --attention resolved and planned under the caps (plan_run), memory checked, and
the KV cache the plan asks for (make_cache). The config comes in validated and frozen
(LcrunConfig); a resolved value, such as the attention the plan chose, is a new copy."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from lcrun.config import LcrunConfig
from lcrun.errors import CapacityError, ConfigError
from lcrun.runtime.kv_cache import AttentionCache, DenseCache
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.positions import PositionRule
from lcrun.runtime.weight_footprint import weight_footprint, weights_mode
from lcrun.runtime.weight_source import WeightSource
from lcrun.units import format_bytes, short_dtype

if TYPE_CHECKING:
    from lcrun.planner import AttentionChoice, Hardware, ModelSpec

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


def cpu_ignored_settings(config: LcrunConfig) -> str | None:
    """One line naming the settings a CPU run does not use (they size the GPU and the KV tiers that
    offload from it), or None. --host-mem applies: it caps the CPU run's memory (check_host_memory)
    and the auto attention choice."""
    flags = [f"--gpu-mem {config.gpu_mem}" if config.gpu_mem is not None else None,
             "--kv-dtype fp8" if config.kv_dtype == "fp8" else None,
             f"--kv-dir {config.kv_dir}" if config.kv_dir is not None else None]
    flags = [f for f in flags if f]
    if not flags:
        return None
    return (f"{', '.join(flags)} {'does' if len(flags) == 1 else 'do'} not apply on the CPU (GPU memory and the KV "
            f"pages offloaded from it): ignored")


def planner_model(config: LcrunConfig, model_cfg: ModelConfig, dtype: torch.dtype, weights: str,
                  source: WeightSource | None = None) -> "ModelSpec":
    """The planner's view of the model: its shape, trained window, and its weights' format and
    bytes as ``weights`` (a weights_mode value) loads them from ``source`` (None: synthetic)."""
    from lcrun.planner import ModelSpec
    elem = dtype.itemsize
    footprint = weight_footprint(model_cfg, dtype, weights, source)
    return ModelSpec.from_dict(model_cfg.to_dict(), weight_bytes=footprint.nbytes, weight_format=footprint.label,
                               weight_read_bytes=footprint.read_bytes, weight_scratch_bytes=footprint.scratch_bytes,
                               kv_dtype_bytes=elem, name=model_cfg.name, dtype=short_dtype(str(dtype)),
                               offload_kv_dtype_bytes=config.offload_kv_dtype_bytes,
                               kv_layers=len(model_cfg.global_layers), local_kv_bytes=model_cfg.local_kv_bytes(elem))


def planner_hardware(config: LcrunConfig, device: torch.device, *, what_if: bool = False,
                     gpu: str | None = None) -> "Hardware":
    """The machine the plan is for. ``gpu`` (lcrun plan --gpu): a built-in GPU profile
    (lcrun.planner.gpus), capped at --gpu-mem. On CUDA: this GPU, capped at --gpu-mem or, unset,
    its total memory, with its calibration (the GPU links measured once if none are stored). On the
    CPU: host memory; with ``what_if`` (lcrun plan) and --gpu-mem, a GPU of --gpu-mem instead. A
    what-if plan takes a host of --host-mem even where that is more than this machine has."""
    from lcrun.planner import detect_hardware
    if gpu is not None:
        from lcrun.planner.gpus import gpu_profile
        from lcrun.planner.hardware import profile_hardware
        host, note = _what_if_host(config)
        hw = profile_hardware(gpu_profile(gpu), gpu_mem=config.gpu_mem, host_mem=config.host_mem,
                              kv_dir=config.kv_dir, **host)
        if note:
            hw.notes.append(note)
        return hw
    if device.type == "cuda":
        from lcrun.offload.calibrate import gpu_calibration
        props = torch.cuda.get_device_properties(device)
        return detect_hardware(props.name, props.total_memory, gpu_mem=config.gpu_mem, host_mem=config.host_mem,
                               kv_dir=config.kv_dir, calibration=gpu_calibration(device, props.name))
    if not (what_if and config.gpu_mem is not None):
        return detect_hardware(None, None, gpu_mem=config.gpu_mem, host_mem=config.host_mem, kv_dir=config.kv_dir)
    host, note = _what_if_host(config)
    hw = detect_hardware("GPU of --gpu-mem (no GPU on this machine)", config.gpu_mem_bytes, gpu_mem=config.gpu_mem,
                         host_mem=config.host_mem, kv_dir=config.kv_dir, **host)
    if note:
        hw.notes.append(note)
    return hw


def _what_if_host(config: LcrunConfig) -> tuple[dict[str, int], str | None]:
    """Host memory of a planned machine: --host-mem as its memory where that is more than this
    machine has (detect_hardware's overrides, and a note saying so)."""
    if config.host_mem is None:
        return {}, None
    import psutil
    vm, cap = psutil.virtual_memory(), config.host_mem_bytes
    if cap <= vm.total:
        return {}, None
    return (dict(host_total_bytes=cap, host_available_bytes=cap),
            f"planned for a host with --host-mem {format_bytes(cap)} (this machine has {format_bytes(vm.total)})")


def plan_run(config: LcrunConfig, model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype, *,
             source: WeightSource | None = None, what_if: bool = False, cpu_plan: bool = False,
             gpu: str | None = None) -> "AttentionChoice":
    """The one place a run's plan is made (lcrun plan, run, chat, bench and LLM): --attention
    resolved (auto: see lcrun.planner.choose) and, on a GPU, the plan for it, from the same inputs
    (prefill chunk, calibration, page size, budget, KV dtype, positions, the weights' format and
    bytes read from ``source``, None for synthetic models). ``config`` must be resolved.
    ``what_if``/``cpu_plan``: lcrun plan's hypothetical GPU (weights held as a GPU run holds them)
    and its plan on a CPU, which has the CPU run's page size (no plan chooses one there:
    make_cache); ``gpu``: lcrun plan --gpu's profile (planner_hardware)."""
    from lcrun.planner import choose_attention
    check_weights(config, source)
    on_gpu = device.type == "cuda" or gpu is not None or (what_if and config.gpu_mem is not None)
    weights = weights_mode(config.weights, torch.device("cuda" if on_gpu else "cpu"))  # as that run loads them
    hw = planner_hardware(config, device, what_if=what_if, gpu=gpu)
    pages: dict[str, Any] = dict(page_size=config.page_size)
    if not hw.on_gpu and config.page_size is None:
        pages = dict(page_size=config.unplanned_page_size(), page_size_reason="the CPU run's (--page-size to change)")
    return choose_attention(planner_model(config, model_cfg, dtype, weights, source), config.ctx_tokens, hw,
                            attention=config.attention, positions=config.positions, cpu_plan=cpu_plan,
                            budget_tokens=config.budget, sink_tokens=config.sink_tokens,
                            window_tokens=config.window_tokens, prefill_chunk=config.prefill_chunk, **pages)


def build_cache(config: LcrunConfig, model_cfg: ModelConfig, device: torch.device,
                dtype: torch.dtype) -> tuple[AttentionCache, "AttentionChoice", LcrunConfig]:
    """The run's KV cache as LLM builds it (attention resolved, planned under the caps): for
    harnesses that bring their own model. Returns the cache, the choice and the resolved config."""
    choice = plan_run(config, model_cfg, device, dtype)
    config = dataclasses.replace(config, attention=choice.attention)
    plan = choice.plan if device.type == "cuda" and config.attention == "topk" else None
    return make_cache(config, model_cfg, device, dtype, plan), choice, config


def check_host_memory(config: LcrunConfig, model_cfg: ModelConfig, dtype: torch.dtype, positions: PositionRule) -> None:
    """On the CPU the weights and the whole KV cache (top-k: and its page abstracts) live in RAM:
    refuse, before allocating, what does not fit under --host-mem or, unset, the available memory."""
    import psutil
    elem = torch.tensor([], dtype=dtype).element_size()
    ctx = config.ctx_tokens
    kv = model_cfg.kv_bytes_per_token(elem) * ctx + model_cfg.local_kv_bytes(elem)
    if config.attention == "topk":  # min and max per page and KV head; a second set when positions may move
        pages = -(-ctx // config.unplanned_page_size())
        sets = 2 if positions.may_move else 1
        kv += 2 * sets * len(model_cfg.global_layers) * model_cfg.num_kv_heads * pages * model_cfg.head_dim * elem
    weights = model_cfg.num_parameters() * elem
    cap = config.host_mem_bytes
    room = cap if cap is not None else psutil.virtual_memory().available
    if weights + kv > room:
        where = f"the --host-mem cap of {format_bytes(cap)}" if cap is not None else \
            f"the {format_bytes(room)} of memory available"
        raise CapacityError(f"on the CPU the weights ({format_bytes(weights)}) and the KV cache for {ctx:,} tokens "
                            f"({format_bytes(kv)}) need {format_bytes(weights + kv)}, more than {where}: "
                            "lower --ctx or run on a GPU")


def check_weights(config: LcrunConfig, source: WeightSource | None) -> None:
    """Refuse, before loading, --weights a file cannot be loaded with: a format the gguf package
    cannot quantize (its K-quants only dequantize), asked of a file (synthetic models are made in it)."""
    from lcrun.kernels.quant.quantize import WEIGHT_FORMATS, check_quantizable
    fmt = WEIGHT_FORMATS.get(config.weights)
    if fmt is not None and source is not None:
        check_quantizable(fmt, source.path)


def resolve_positions(config: LcrunConfig, model_cfg: ModelConfig) -> PositionRule:
    """When queries move to window positions (lcrun.runtime.positions) for --positions
    auto|true|window. auto: true positions while the sequence is inside the trained window, window
    positions past it. The trained window is the model's max_position_embeddings (GGUF
    context_length): for llama3-scaled models that is the length they were fine-tuned to with the
    scaling (131072 for Llama 3.1), not the original 8192."""
    if config.positions == "window" and config.attention == "dense":
        raise ConfigError("--positions window needs --attention topk (dense attention attends to every "
                          "token, so there is no window to place them in)")
    if config.attention == "dense":
        return PositionRule(None)
    return PositionRule.for_run(config.positions, model_cfg.max_position_embeddings, config.ctx_tokens)


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
    """The run's cache for --attention; a model with sliding-window layers (Gemma 3) keeps those in
    a ring of their window on the device and gives the run's cache its global layers only."""
    from lcrun.runtime.layer_kind_cache import with_local_ring
    return with_local_ring(model_cfg, config.ctx_tokens, device, dtype,
                           lambda cfg: _run_cache(config, cfg, device, dtype, plan))


def _run_cache(config: LcrunConfig, model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
               plan=None) -> AttentionCache:
    positions = resolve_positions(config, model_cfg)
    if config.attention == "dense":
        return DenseCache(model_cfg, config.ctx_tokens, device, dtype)
    if plan is not None and not plan.all_on_gpu:
        from lcrun.runtime.tiered import TieredTopKCache
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
                               sparse_prefill=config.prefill == "topk", prefetch=config.prefetch, positions=positions,
                               kv_dtype=torch.float8_e4m3fn if config.kv_dtype == "fp8" else None, **tiers)
    from lcrun.runtime.paged_cache import PagedTopKCache
    # The plan's page size (the one its memory accounting used) when there is a plan.
    page_size = plan.page_size if plan is not None else config.unplanned_page_size()
    # Hierarchical selection (chunk abstracts) for long caches, flat below (auto_chunk_pages).
    return PagedTopKCache(model_cfg, config.ctx_tokens, device, dtype, page_size=page_size,
                          budget=config.budget, sink_tokens=config.sink_tokens,
                          window_tokens=config.window_tokens, group_score=config.group_score, chunk_pages="auto",
                          positions=positions)
