"""The memory plan: where weights, workspace, page abstracts and every KV page live, and what a
decode step is predicted to cost.

A page is P tokens of ONE KV head of ONE layer (a K page and a V page of P*head_dim elements). Its
abstract (per-channel key min and max, 2*head_dim elements) stays on the GPU so each decode step
can score every page and pick the top ones within the token budget. Past the model's trained
window (unless positions are 'true') the top-k caches keep two abstracts per page, key min/max at
true positions and page-relative (``abstract_sets``). Pages have one home tier:

* GPU: the slot pool. Part of it is *home* to pages (sinks and the local window of every layer
  always, then as many more as fit); the rest is a *reuse cache* of copies of host/NVMe pages
  fetched for recent selections (pages are immutable once full, so a copy is dropped, never
  written back).
* pinned host memory: the pages that do not fit the GPU, up to the host cap.
* NVMe files under --kv-dir: the rest. The prefetcher promotes them to host ahead of need.

Every rule and constant below is documented where it is defined; ``lcrun.planner.explain`` prints
the result. Nothing here imports torch: the plan is plain arithmetic, checked by unit tests.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lcrun.errors import CapacityError, ConfigError
from lcrun.planner.hardware import Hardware
from lcrun.planner.spec import ModelSpec
from lcrun.units import format_bytes, parse_tokens

KiB, MiB, GiB = 1024, 1024**2, 1024**3

PAGE_SIZES = (16, 32, 64, 128)
# Page size rule (auto): the smallest P whose page abstracts (all layers, all heads) fit within
# ABSTRACT_SHARE of the device cap and whose K (or V) page is at least MIN_TRANSFER_BYTES.
# Why: abstracts are 2*D elements per 2*P*D of K/V, i.e. 1/P of the KV; larger pages cut abstract
# memory and scoring work and make each host->GPU copy bigger (copies below ~8 KiB waste PCIe on
# per-transfer overhead; 32 KiB+ reach full speed). Smaller pages select more precisely, so we take
# the smallest P that passes. If no P passes the abstract share, P = 128 and chunk abstracts.
ABSTRACT_SHARE = 0.10
MIN_TRANSFER_BYTES = 8 * KiB
# Chunk abstracts: one abstract per group of C pages stays on the GPU; page abstracts move to
# pinned host memory and only those of the selected chunks come over each step. C is the smallest
# of these whose chunk abstracts fit the share (smaller C = fewer page abstracts to fetch).
CHUNK_SIZES = (8, 16, 32, 64, 128, 256, 512)

# Hit-rate assumption: a page selected for (layer, head) at this step was selected at the previous
# step with probability DEFAULT_HIT_RATE (top-k page selection drifts slowly as decode advances;
# Quest/InfLLM report 70-90% overlap). Such a page is still in the GPU reuse cache. The other
# selected pages are random draws that are on the GPU when their home is there.
DEFAULT_HIT_RATE = 0.8

# Held back from the cap for what the planner does not itemise: the CUDA context (outside torch's
# allocator but inside the GPU's total), cuBLAS/Triton workspaces, allocator fragmentation.
RUNTIME_RESERVE_BYTES = 512 * MiB
# Prefill chunk (auto): the largest power of two <= MAX_PREFILL_CHUNK whose workspace fits.
MAX_PREFILL_CHUNK = 8192
MIN_PREFILL_CHUNK = 16
# Keeping all KV on the GPU is chosen only if a prefill chunk of at least this fits beside it:
# prefill at tiny chunks is slower than a host tier costs (for a short ctx: the ctx itself).
MIN_CHUNK_ALL_GPU = 1024
# The last token's logits: bf16 lm_head output, fp32 copy, softmax probs, top-p sort scratch.
LOGITS_COPIES = 4
# Free space left on the --kv-dir drive beyond the NVMe pages (the filesystem needs some).
DISK_HEADROOM_BYTES = 1 * GiB


@dataclass
class DecodeTerm:
    """One line of the decode-time prediction: ``bytes`` over a link of ``bytes_per_s``."""

    name: str
    link: str
    bytes: float
    bytes_per_s: float
    seconds: float


@dataclass
class MemoryPlan:
    """Where everything lives, and the predicted decode time per token.

    Sizes are bytes, counts are pages (one page = P tokens of one KV head of one layer, K and V).
    ``gpu_breakdown`` and ``workspace_breakdown`` are ordered {item: bytes}; ``decode_terms`` sum to
    ``decode_s_per_token`` (no overlap assumed: the prefetcher may hide transfers behind compute,
    ``decode_s_overlapped`` is that best case).
    """

    model: ModelSpec
    hardware: Hardware
    ctx_tokens: int
    attention: str
    device: str                      # "cuda" or "cpu"
    device_cap_bytes: int
    weights_bytes: int
    runtime_reserve_bytes: int
    prefill_chunk: int
    prefill_chunk_auto: bool
    workspace_bytes: int
    workspace_breakdown: dict[str, int]
    page_size: int
    page_size_auto: bool
    page_size_reason: str
    page_bytes: int                  # K + V of one page
    transfer_bytes: int              # one K (or V) page: the unit of a host->GPU copy
    kv_bytes_per_token: int
    kv_total_bytes: int              # all pages, i.e. ctx rounded up to whole pages
    pages_per_head: int              # per layer and KV head
    total_pages: int
    abstract_mode: str               # "page", "chunk" or "none" (dense)
    abstract_sets: int               # abstracts per page: 2 past the trained window (see abstract_sets()), else 1
    chunk_pages: int                 # C (chunk mode), else 0
    page_abstract_bytes: int         # all page abstracts, wherever they live
    abstract_gpu_bytes: int          # abstracts on the GPU (page, or chunk abstracts)
    abstract_host_bytes: int         # page abstracts on the host (chunk mode)
    abstract_cache_bytes: int        # GPU cache of the selected chunks' page abstracts (chunk mode)
    page_table_bytes: int
    selection_bytes: int
    gpu_slots: int                   # the GPU page pool, in pages
    gpu_home_pages: int              # pages whose home is the GPU (sinks + window + as many as fit)
    gpu_cache_slots: int             # reuse cache for copies of host/NVMe pages
    resident_pages: int              # sinks + window of every layer and head (part of home)
    min_gpu_slots: int
    host_pages: int
    host_staging_pages: int          # host slots for NVMe pages promoted ahead of need
    nvme_pages: int
    all_on_gpu: bool
    budget_tokens: int
    sink_tokens: int
    window_tokens: int
    selected_pages_per_head: int     # entries per KV head and layer per step (sinks + window + top)
    top_pages_per_head: int          # of which chosen by score
    prefetch_depth: int              # layers fetched ahead (0: nothing to fetch)
    hit_rate: float                  # the assumption
    effective_hit_rate: float        # after a reuse cache smaller than one step's selection
    miss_pages_per_token: float
    decode_terms: list[DecodeTerm]
    decode_s_per_token: float
    decode_s_overlapped: float
    bottleneck: str
    gpu_breakdown: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_used_bytes(self) -> int:
        return sum(self.gpu_breakdown.values())

    @property
    def gpu_free_bytes(self) -> int:
        return self.device_cap_bytes - self.gpu_used_bytes

    @property
    def host_bytes(self) -> int:
        return (self.host_pages + self.host_staging_pages) * self.page_bytes + self.abstract_host_bytes

    @property
    def nvme_bytes(self) -> int:
        return self.nvme_pages * self.page_bytes

    @property
    def decode_tokens_per_s(self) -> float:
        return 1.0 / self.decode_s_per_token if self.decode_s_per_token > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready values (the hardware with where each number came from)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["model"] = self.model.to_dict()
        d["hardware"] = self.hardware.to_dict()
        d["decode_terms"] = [dataclasses.asdict(t) for t in self.decode_terms]
        d["workspace_breakdown"] = dict(self.workspace_breakdown)
        d["gpu_breakdown"] = dict(self.gpu_breakdown)
        d["notes"] = list(self.notes)
        d.update(gpu_used_bytes=self.gpu_used_bytes, gpu_free_bytes=self.gpu_free_bytes,
                 host_bytes=self.host_bytes, nvme_bytes=self.nvme_bytes,
                 decode_tokens_per_s=self.decode_tokens_per_s)
        return d


# -- pieces -------------------------------------------------------------------------------------

def workspace_breakdown(model: ModelSpec, chunk: int, *, act_bytes: int = 2, stream_kv: bool = False) -> dict[str, int]:
    """Activation memory of one prefill chunk of ``chunk`` tokens (layers run one at a time).

    hidden states:  4*T*hidden*a      residual x, its norm, the attention-out and MLP-down outputs
    q/k/v + rope:   2*T*(H+2*Hkv)*D*a the fused qkv output and the rotated q/k copies
    MLP:            4*T*I*a           gate|up (2I), silu(gate) and the product
    attention:      T*H*D*4 + 2*T*H*4 fp32 partial outputs and running max/sum of split attention
    KV stream:      2*T*Hkv*D*2*e     tiered only: past K/V of one layer streamed from the host in
                                      T-token blocks, double-buffered, for exact prefill attention
    logits:         V*4*4             the last token's logits (bf16, fp32, probs, sort scratch)
    dequant scratch: model.weight_scratch_bytes   quantized weights: one matrix dequantized for prefill
    """
    t, a = chunk, act_bytes
    h, hq, hkv, d = model.hidden_size, model.num_heads, model.num_kv_heads, model.head_dim
    out = {
        "hidden states": 4 * t * h * a,
        "q/k/v + rope": 2 * t * (hq + 2 * hkv) * d * a,
        "MLP": 4 * t * model.mlp_size * a,
        "attention scratch": t * hq * d * 4 + 2 * t * hq * 4,
        "KV stream buffer": 2 * t * hkv * d * 2 * model.kv_dtype_bytes if stream_kv else 0,
        "logits + sampling": model.vocab_size * 4 * LOGITS_COPIES,
        "dequant scratch": model.weight_scratch_bytes,
    }
    return out


def selection_counts(page_size: int, sink_tokens: int, window_tokens: int, budget_tokens: int,
                     pages_per_head: int) -> tuple[int, int, int]:
    """(selected entries, top-scored entries, sink + window pages) per KV head and layer.

    Same arithmetic as ``lcrun.kernels.select.max_entries`` (which the planner may not import):
    budget//P + 1 entries, the window spans ceil(window/P) + 1 pages (the newest is partial).
    """
    p = page_size
    sink_pages = -(-sink_tokens // p)
    window_pages = -(-window_tokens // p) + 1
    kmax = max(budget_tokens // p + 1, sink_pages + window_pages)
    fixed = min(pages_per_head, sink_pages + window_pages)
    selected = min(kmax, pages_per_head)
    return selected, max(0, selected - fixed), fixed


POSITIONS = ("auto", "true", "window")


def abstract_sets(model: ModelSpec, ctx_tokens: int, positions: str = "auto") -> int:
    """Sets of page abstracts a top-k cache keeps: 2 when queries may move to window positions (key
    min/max at true positions, and page-relative for window positions; same shape each), else 1.
    They may move with --positions window, and with auto when ``ctx_tokens`` is past the model's
    trained window (as lcrun.runtime.positions.PositionRule.for_run decides)."""
    if positions == "window":
        return 2
    if positions == "true" or model.trained_window is None or ctx_tokens <= model.trained_window:
        return 1
    return 2


def page_abstract_bytes(model: ModelSpec, ctx_tokens: int, page_size: int, sets: int = 1) -> int:
    """All page abstracts (every layer and KV head) of ``sets`` sets."""
    pages = -(-ctx_tokens // page_size) * model.context_layers * model.num_kv_heads
    return pages * 2 * model.head_dim * model.kv_dtype_bytes * sets


def choose_page_size(model: ModelSpec, ctx_tokens: int, cap_bytes: int, *, attention: str = "topk",
                     budget_tokens: int = 2048, sink_tokens: int = 64,
                     window_tokens: int = 512, abstract_sets: int = 1) -> tuple[int, str]:
    """The auto page size and why (see PAGE_SIZES' comment for the rule); ``abstract_sets`` as
    make_plan counts them (2 past the trained window: see abstract_sets())."""
    allowed = [p for p in PAGE_SIZES if attention == "dense" or budget_tokens >= sink_tokens + window_tokens + p]
    if not allowed:
        raise ConfigError(f"--budget {budget_tokens} leaves no room for selected pages after {sink_tokens} sink and "
                          f"{window_tokens} window tokens: raise --budget or lower --sink-tokens/--window-tokens")
    share = ABSTRACT_SHARE * cap_bytes
    big_enough = [p for p in allowed if p * model.head_dim * model.kv_dtype_bytes >= MIN_TRANSFER_BYTES]
    for p in big_enough:
        if attention == "dense":
            return p, f"smallest with {format_bytes(MIN_TRANSFER_BYTES)}+ page copies"
        if page_abstract_bytes(model, ctx_tokens, p, abstract_sets) <= share:
            return p, (f"smallest with {format_bytes(MIN_TRANSFER_BYTES)}+ page copies and page abstracts "
                       f"within {ABSTRACT_SHARE:.0%} of the cap")
    p = allowed[-1]
    if not big_enough:
        return p, f"largest allowed: no size gives {format_bytes(MIN_TRANSFER_BYTES)}+ page copies at this head_dim"
    return p, f"largest: page abstracts exceed {ABSTRACT_SHARE:.0%} of the cap at every size, so chunk abstracts"


def _about_tokens(n: float) -> str:
    """A token count rounded down to whole k (1024), written as --ctx takes it."""
    return f"{max(0, int(n) // 1024)}k"


# -- the planner --------------------------------------------------------------------------------

def make_plan(model: ModelSpec, ctx_tokens: int | str, hw: Hardware, *, page_size: int | None = None,
              budget_tokens: int = 2048, sink_tokens: int = 64, window_tokens: int = 512,
              prefill_chunk: int | None = None, attention: str = "topk", positions: str = "auto",
              hit_rate: float = DEFAULT_HIT_RATE, page_size_reason: str = "given (--page-size)") -> MemoryPlan:
    """Plan memory for ``ctx_tokens`` of ``model`` on ``hw``; raises CapacityError (what is short,
    by how much, which setting fixes it) or ConfigError (a setting lcrun cannot use).

    ``positions`` is the --positions setting: with top-k attention past the model's trained window
    (and positions not 'true') every page has two abstracts (abstract_sets()). ``page_size_reason``:
    why a given ``page_size`` is what it is, for the plan's page size line."""
    ctx = parse_tokens(ctx_tokens)
    if attention not in ("topk", "dense"):
        raise ConfigError(f"attention must be topk or dense, got {attention!r}")
    if positions not in POSITIONS:
        raise ConfigError(f"--positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    if page_size is not None and page_size not in PAGE_SIZES:
        raise ConfigError(f"--page-size must be 16, 32, 64 or 128, got {page_size}")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ConfigError(f"--prefill-chunk must be at least 1, got {prefill_chunk}")
    if min(budget_tokens, sink_tokens + 1, window_tokens + 1) < 1:
        raise ConfigError("--budget must be positive and --sink-tokens/--window-tokens not negative")
    if not 0.0 <= hit_rate <= 1.0:
        raise ConfigError(f"hit_rate must be within 0..1, got {hit_rate}")
    if attention == "topk" and page_size is not None and budget_tokens < sink_tokens + window_tokens + page_size:
        raise ConfigError(f"--budget {budget_tokens} leaves no room for selected pages after {sink_tokens} sink and "
                          f"{window_tokens} window tokens: raise --budget or lower --sink-tokens/--window-tokens")

    m = model
    L, hkv, hq, d, e = m.context_layers, m.num_kv_heads, m.num_heads, m.head_dim, m.kv_dtype_bytes
    on_gpu = hw.on_gpu
    dev = "GPU" if on_gpu else "host memory"
    cap_flag = "--gpu-mem" if on_gpu else "--host-mem"
    cap = hw.device_cap_bytes
    act = 2 if on_gpu else 4  # bf16 activations on GPU, fp32 on CPU
    reserve = RUNTIME_RESERVE_BYTES
    notes = list(hw.notes)
    name = m.name or "the model"

    # -- weights: all on the compute device --------------------------------------------------------
    if m.weight_bytes > cap:
        if on_gpu and hw.gpu_total_bytes and cap < hw.gpu_total_bytes:
            more = f"or raise --gpu-mem (the GPU has {format_bytes(hw.gpu_total_bytes)})"
        elif on_gpu:
            more = f"or a GPU with more memory (this one has {format_bytes(cap)})"
        else:
            more = "or raise --host-mem"
        raise CapacityError(
            f"the weights of {name} need {format_bytes(m.weight_bytes)}, {format_bytes(m.weight_bytes - cap)} more "
            f"than the {dev} cap of {format_bytes(cap)} (and the KV cache and workspace need room too). Use a "
            f"smaller model, a quantized one (e.g. a Q8_0 or Q4_K GGUF), {more}")

    # -- page size and abstracts --------------------------------------------------------------------
    sets = abstract_sets(m, ctx, positions) if attention == "topk" else 0
    if page_size is None:
        P, reason = choose_page_size(m, ctx, cap, attention=attention, budget_tokens=budget_tokens,
                                     sink_tokens=sink_tokens, window_tokens=window_tokens,
                                     abstract_sets=max(1, sets))
    else:
        P, reason = page_size, page_size_reason
    page_bytes = 2 * P * d * e
    # The abstracts of one page: key min and max over D channels, per set. A decode step ranks with
    # one set (true-position or page-relative), so scoring reads one set.
    abstract_unit = 2 * d * e * max(1, sets)
    chunk_unit = 2 * d * e  # chunk abstracts (and the selected chunks' page abstracts): one set, the one ranked
    pages_per_head = -(-ctx // P)
    total_pages = pages_per_head * L * hkv
    kv_total = total_pages * page_bytes
    all_page_abstracts = total_pages * abstract_unit if attention == "topk" else 0
    if sets == 2:
        why = ("--positions window" if positions == "window" else
               f"{ctx:,} tokens is past the model's trained window of {m.trained_window:,}")
        notes.append(f"{why}: every page keeps two abstracts (key min/max at true positions and page-relative), "
                     f"{format_bytes(all_page_abstracts)} in all")
    if attention == "topk":
        selected, top, fixed_pages = selection_counts(P, sink_tokens, window_tokens, budget_tokens, pages_per_head)
    else:
        selected, top, fixed_pages = pages_per_head, 0, pages_per_head
    resident = L * hkv * fixed_pages

    def selection_bytes(candidates: int) -> int:
        # per-layer scores (fp32, every query head, then the GQA-combined ones) and the selected
        # entries (page id, slot, length, flags), double-buffered for look-ahead selection
        return 2 * ((hq + hkv) * candidates * 4 + hkv * max(selected, 1) * 16)

    def chunks(minimum: int) -> list[int]:
        """Prefill chunk candidates, largest first: the given one, or powers of two from
        min(MAX_PREFILL_CHUNK, ctx rounded up to a power of two) down to ``minimum``."""
        if prefill_chunk is not None:
            return [prefill_chunk]
        top_chunk = min(MAX_PREFILL_CHUNK, 1 << max(0, (ctx - 1).bit_length()))
        out, c = [], top_chunk
        while c >= max(MIN_PREFILL_CHUNK, min(minimum, top_chunk)):
            out.append(c)
            c //= 2
        return out or [top_chunk]

    def ws_total(chunk: int, stream_kv: bool) -> tuple[int, dict[str, int]]:
        parts = workspace_breakdown(m, chunk, act_bytes=act, stream_kv=stream_kv)
        return sum(parts.values()), parts

    # -- all on the device? -------------------------------------------------------------------------
    gpu_fixed_all = 0
    if attention == "topk":
        gpu_fixed_all = all_page_abstracts + total_pages * 4 + selection_bytes(pages_per_head)
    room_all = cap - m.resident_bytes - reserve - gpu_fixed_all - kv_total
    chosen = None
    min_all = MIN_PREFILL_CHUNK if attention == "dense" else MIN_CHUNK_ALL_GPU
    for c in chunks(min_all):
        ws, parts = ws_total(c, False)
        if ws <= room_all:
            chosen = (c, ws, parts)
            break

    if chosen is not None:
        c, ws, parts = chosen
        page_table = total_pages * 4 if attention == "topk" else 0
        sel = selection_bytes(pages_per_head) if attention == "topk" else 0
        breakdown = {"weights": m.weight_bytes, **_local_windows(m), "runtime reserve": reserve, "workspace": ws}
        if attention == "topk":
            breakdown.update({"page abstracts": all_page_abstracts, "page table": page_table,
                              "selection buffers": sel})
        breakdown["KV pages"] = kv_total
        notes.append("the whole KV cache fits on the GPU: no host or NVMe tier" if on_gpu
                     else "the whole KV cache fits in host memory: no NVMe tier")
        attended = min(ctx, selected * P) if attention == "topk" else ctx
        terms = _decode_terms(hw, m, kv_read=L * hkv * attended * 2 * d * e, scoring=all_page_abstracts // max(1, sets),
                              h2d=0.0, disk=0.0, dense=attention == "dense")
        return _finish(
            m, hw, ctx, attention, notes, terms,
            device_cap_bytes=cap, weights_bytes=m.weight_bytes, runtime_reserve_bytes=reserve,
            prefill_chunk=c, prefill_chunk_auto=prefill_chunk is None, workspace_bytes=ws,
            workspace_breakdown=parts, page_size=P, page_size_auto=page_size is None, page_size_reason=reason,
            page_bytes=page_bytes, transfer_bytes=P * d * e, kv_bytes_per_token=m.kv_bytes_per_token,
            kv_total_bytes=kv_total, pages_per_head=pages_per_head, total_pages=total_pages,
            abstract_mode="page" if attention == "topk" else "none", abstract_sets=sets, chunk_pages=0,
            page_abstract_bytes=all_page_abstracts, abstract_gpu_bytes=all_page_abstracts, abstract_host_bytes=0,
            abstract_cache_bytes=0, page_table_bytes=page_table, selection_bytes=sel, gpu_slots=total_pages,
            gpu_home_pages=total_pages, gpu_cache_slots=0, resident_pages=total_pages,
            min_gpu_slots=total_pages, host_pages=0, host_staging_pages=0, nvme_pages=0, all_on_gpu=True,
            budget_tokens=budget_tokens, sink_tokens=sink_tokens, window_tokens=window_tokens,
            selected_pages_per_head=selected, top_pages_per_head=top, prefetch_depth=0, hit_rate=hit_rate,
            effective_hit_rate=1.0, miss_pages_per_token=0.0, gpu_breakdown=breakdown)

    if not on_gpu:  # a CPU run keeps its whole KV cache in host memory: no tiers to spill to
        ws_min, _ = ws_total(prefill_chunk or MIN_PREFILL_CHUNK, False)
        room = cap - m.resident_bytes - reserve - ws_min - gpu_fixed_all
        fit = _about_tokens(room / m.kv_bytes_per_token) if room > 0 else "0k"
        raise CapacityError(
            f"on the CPU the whole KV cache stays in host memory: {format_bytes(kv_total)} for {ctx} tokens, "
            f"{format_bytes(kv_total - room)} more than the {format_bytes(cap)} cap leaves after the weights"
            f"{' and page abstracts' if gpu_fixed_all else ''} and workspace. Use a smaller --ctx (about {fit} "
            f"fits), raise --host-mem, or run on a GPU")
    if attention == "dense":
        ws_min, _ = ws_total(prefill_chunk or MIN_PREFILL_CHUNK, False)
        room = cap - m.resident_bytes - reserve - ws_min
        fit = _about_tokens(room / m.kv_bytes_per_token) if room > 0 else "0k"
        short = kv_total - room
        raise CapacityError(
            f"dense attention keeps the whole KV cache on the {dev}: {format_bytes(kv_total)} for {ctx} tokens, "
            f"{format_bytes(short)} more than the {format_bytes(cap)} cap leaves after the weights and workspace. "
            f"Use --attention topk (pages spill to host memory), a smaller --ctx (about {fit} fits), "
            f"or raise {cap_flag}")

    # -- tiered: pages may be stored narrower than on the GPU (fp8) -----------------------------------
    eo = m.offload_kv_dtype_bytes or e
    if eo != e:
        page_bytes = 2 * P * d * eo
        kv_total = total_pages * page_bytes
        notes.append(f"KV pages in the tiered store take {eo} byte(s) per element (the model's KV takes {e}): "
                     f"{format_bytes(page_bytes)} per page, on the GPU, in host memory, on NVMe and over PCIe")

    # -- tiered: abstracts ----------------------------------------------------------------------------
    share = ABSTRACT_SHARE * cap
    chunk_pages = 0
    if all_page_abstracts <= share or not on_gpu:  # on CPU abstracts share the one memory anyway
        mode = "page"
        abstract_gpu, abstract_host, abstract_cache = all_page_abstracts, 0, 0
        candidates = pages_per_head
    else:
        mode = "chunk"
        for C in CHUNK_SIZES:
            if -(-pages_per_head // C) * L * hkv * chunk_unit <= share:
                chunk_pages = C
                break
        else:
            raise CapacityError(
                f"{ctx} tokens need {format_bytes(all_page_abstracts)} of page abstracts; even chunk abstracts of "
                f"{CHUNK_SIZES[-1]} pages exceed {ABSTRACT_SHARE:.0%} of the {dev} cap ({format_bytes(share)}). "
                f"Use a smaller --ctx or raise {cap_flag}")
        n_chunks = -(-pages_per_head // chunk_pages)
        k_chunks = min(n_chunks, max(1, top))  # as many chunks as top pages: each could sit in its own
        abstract_gpu = L * hkv * n_chunks * chunk_unit
        abstract_host = all_page_abstracts
        abstract_cache = L * hkv * k_chunks * chunk_pages * chunk_unit
        candidates = n_chunks + k_chunks * chunk_pages
        notes.append(f"page abstracts ({format_bytes(all_page_abstracts)}) exceed {ABSTRACT_SHARE:.0%} of the "
                     f"{dev} cap: chunk abstracts of {chunk_pages} pages on the {dev}, page abstracts in host memory; "
                     f"selection is hierarchical (top {k_chunks} chunks, then pages)")
    page_table = total_pages * 4
    sel = selection_bytes(candidates)
    fixed = m.resident_bytes + reserve + abstract_gpu + abstract_cache + page_table + sel

    # -- tiered: prefill chunk and slots -----------------------------------------------------------------
    cache_target = L * hkv * top  # one decode step's scored pages, all layers: what the reuse cache holds

    def min_slots(depth: int) -> int:
        return resident + (depth + 1) * hkv * top  # sinks/window everywhere + layers in flight

    room = cap - fixed - min_slots(1) * page_bytes
    chosen = None
    for c in chunks(MIN_PREFILL_CHUNK):
        ws, parts = ws_total(c, True)
        if ws <= room:
            chosen = (c, ws, parts)
            break
    if chosen is None:
        c = prefill_chunk or MIN_PREFILL_CHUNK
        ws, _ = ws_total(c, True)
        what = f"--prefill-chunk {c}" if prefill_chunk else "the smallest prefill chunk"
        fix = "lower --prefill-chunk, " if prefill_chunk else ""
        raise CapacityError(
            f"the {dev} cap of {format_bytes(cap)} is {format_bytes(ws - room)} short: weights "
            f"{format_bytes(m.weight_bytes)}, abstracts/page table/selection "
            f"{format_bytes(abstract_gpu + abstract_cache + page_table + sel)}, the minimum page cache "
            f"{format_bytes(min_slots(1) * page_bytes)} ({min_slots(1)} pages: sinks and window of every layer plus "
            f"two layers of selected pages) and the workspace of {what} ({format_bytes(ws)}). "
            f"Fix: {fix}raise {cap_flag}, lower --budget/--window-tokens, use a smaller --ctx or a smaller model")
    c, ws, parts = chosen
    slots = (cap - fixed - ws) // page_bytes

    if on_gpu:
        host_kv_cap = hw.host_cap_bytes - abstract_host
        if host_kv_cap < 0:
            raise CapacityError(
                f"the page abstracts of {ctx} tokens ({format_bytes(abstract_host)}) need pinned host memory, "
                f"{format_bytes(-host_kv_cap)} more than the host cap of {format_bytes(hw.host_cap_bytes)}: raise "
                f"--host-mem, use a smaller --ctx or raise --gpu-mem")
        host_cap_pages = host_kv_cap // page_bytes
    else:
        host_cap_pages = 0  # on CPU there is no separate host tier: the device memory is the host

    def tiers(depth: int) -> dict[str, Any] | None:
        # Every GPU slot is a cache: each page's home is the host pool (or NVMe), written through
        # as tokens arrive, so eviction never writes back and a miss can always read its home.
        inflight = (depth + 1) * hkv * top
        if slots < resident + inflight:
            return None
        cache, home = slots, 0
        r_eff = hit_rate * min(1.0, cache / cache_target) if cache_target else hit_rate
        remaining = total_pages
        if remaining <= host_cap_pages:
            host, staging, nvme = remaining, 0, 0
        else:
            staging = min(cache_target, host_cap_pages)  # NVMe pages are promoted into these
            host, nvme = host_cap_pages - staging, remaining - (host_cap_pages - staging)
        miss_prob = 1.0 - r_eff
        misses = L * hkv * top * miss_prob
        nvme_share = nvme / remaining if remaining else 0.0
        abstract_fetch = abstract_cache * (1.0 - hit_rate) if on_gpu else 0.0
        return dict(cache=cache, home=home, r_eff=r_eff, host=host, staging=staging, nvme=nvme, misses=misses,
                    h2d=(misses * page_bytes + abstract_fetch) if on_gpu else 0.0,
                    disk=misses * page_bytes * nvme_share)

    t = tiers(1)
    assert t is not None  # guaranteed by the chunk search
    kv_read = L * hkv * min(ctx, selected * P) * 2 * d * eo
    scoring = (abstract_gpu if mode == "chunk" else all_page_abstracts // max(1, sets)) + abstract_cache
    depth = 1
    # Prefetch depth: one layer ahead hides a transfer that takes less than a layer of compute;
    # when it takes longer, fetching two layers ahead gives it two layers of compute to hide behind.
    if on_gpu and t["h2d"] > 0:
        per_layer_compute = (m.decode_weight_bytes + kv_read + scoring) / L / hw.gpu_mem_bytes_per_s
        per_layer_fetch = t["h2d"] / L / hw.h2d_bytes_per_s
        if per_layer_fetch > per_layer_compute:
            t2 = tiers(2)
            if t2 is not None:
                depth, t = 2, t2
            else:
                notes.append("prefetch depth 1: the page cache has no room for a second layer in flight")

    if t["nvme"] > 0:
        need = t["nvme"] * page_bytes
        on_disk_free = (host_cap_pages + t["home"]) // (L * hkv) * P
        fit = f"a smaller --ctx (about {_about_tokens(on_disk_free)} tokens fit without disk)"
        if hw.kv_dir is None:
            where = (f"fit neither the GPU nor the host cap ({format_bytes(hw.host_cap_bytes)})" if on_gpu
                     else f"do not fit the host memory cap ({format_bytes(cap)})")
            raise CapacityError(
                f"{format_bytes(need)} of KV pages {where}: set --kv-dir to a folder on an NVMe drive with at least "
                f"{format_bytes(need + DISK_HEADROOM_BYTES)} free, raise --host-mem, or use {fit}")
        free = hw.kv_dir_free_bytes or 0
        if need + DISK_HEADROOM_BYTES > free:
            raise CapacityError(
                f"--kv-dir {hw.kv_dir} has {format_bytes(free)} free but the NVMe tier needs "
                f"{format_bytes(need + DISK_HEADROOM_BYTES)} ({format_bytes(need)} of pages + "
                f"{format_bytes(DISK_HEADROOM_BYTES)} headroom): free space there, point --kv-dir at a bigger "
                f"drive, raise --host-mem, or use {fit}")

    breakdown = {"weights": m.weight_bytes, **_local_windows(m), "runtime reserve": reserve, "workspace": ws,
                 "page abstracts" if mode == "page" else "chunk abstracts": abstract_gpu}
    if mode == "chunk":
        breakdown["selected chunks' page abstracts"] = abstract_cache
    breakdown.update({"page table": page_table, "selection buffers": sel, "KV page cache": slots * page_bytes})
    terms = _decode_terms(hw, m, kv_read=kv_read, scoring=scoring, h2d=t["h2d"], disk=t["disk"])
    return _finish(
        m, hw, ctx, attention, notes, terms,
        device_cap_bytes=cap, weights_bytes=m.weight_bytes, runtime_reserve_bytes=reserve,
        prefill_chunk=c, prefill_chunk_auto=prefill_chunk is None, workspace_bytes=ws, workspace_breakdown=parts,
        page_size=P, page_size_auto=page_size is None, page_size_reason=reason, page_bytes=page_bytes,
        transfer_bytes=P * d * eo, kv_bytes_per_token=m.offload_kv_bytes_per_token, kv_total_bytes=kv_total,
        pages_per_head=pages_per_head, total_pages=total_pages, abstract_mode=mode, abstract_sets=sets,
        chunk_pages=chunk_pages,
        page_abstract_bytes=all_page_abstracts, abstract_gpu_bytes=abstract_gpu, abstract_host_bytes=abstract_host,
        abstract_cache_bytes=abstract_cache, page_table_bytes=page_table, selection_bytes=sel, gpu_slots=slots,
        gpu_home_pages=t["home"], gpu_cache_slots=t["cache"], resident_pages=resident,
        min_gpu_slots=min_slots(depth), host_pages=t["host"], host_staging_pages=t["staging"],
        nvme_pages=t["nvme"], all_on_gpu=t["home"] == total_pages, budget_tokens=budget_tokens,
        sink_tokens=sink_tokens, window_tokens=window_tokens, selected_pages_per_head=selected,
        top_pages_per_head=top, prefetch_depth=depth, hit_rate=hit_rate, effective_hit_rate=t["r_eff"],
        miss_pages_per_token=t["misses"], gpu_breakdown=breakdown)


def _local_windows(m: ModelSpec) -> dict[str, int]:
    """The local layers' windows as a breakdown row (none for models without them)."""
    return {"local-layer windows": m.local_kv_bytes} if m.local_kv_bytes else {}


def _decode_terms(hw: Hardware, m: ModelSpec, *, kv_read: float, scoring: float, h2d: float,
                  disk: float, dense: bool = False) -> list[DecodeTerm]:
    """Per-token decode cost: every weight once, the selected KV and the abstracts read from device
    memory, the expected misses over PCIe and, for those whose home is NVMe, off the disk."""
    mem = hw.gpu_mem_bytes_per_s
    mem_link = "HBM" if hw.on_gpu else "DRAM"
    rows = [("weights", mem_link, m.decode_weight_bytes, mem),
            *[(name, mem_link, b, mem) for name, b in _local_windows(m).items()],
            ("KV read (all tokens)" if dense else "KV read (selected pages)", mem_link, kv_read, mem),
            ("abstract scoring", mem_link, scoring, mem),
            ("host->GPU page misses", "PCIe", h2d, hw.h2d_bytes_per_s),
            ("NVMe page reads", "disk", disk, hw.disk_read_bytes_per_s)]
    return [DecodeTerm(name, link, float(b), float(bw), b / bw) for name, link, b, bw in rows]


def _finish(m: ModelSpec, hw: Hardware, ctx: int, attention: str, notes: list[str], terms: list[DecodeTerm],
            **values: Any) -> MemoryPlan:
    total = sum(t.seconds for t in terms)
    by_link: dict[str, float] = {}
    for t in terms:
        by_link[t.link] = by_link.get(t.link, 0.0) + t.seconds
    worst = max(terms, key=lambda t: t.seconds)
    plan = MemoryPlan(model=m, hardware=hw, ctx_tokens=ctx, attention=attention,
                      device="cuda" if hw.on_gpu else "cpu", decode_terms=terms, decode_s_per_token=total,
                      decode_s_overlapped=max(by_link.values()), bottleneck=f"{worst.name} ({worst.link})",
                      notes=notes, **values)
    assert plan.gpu_used_bytes <= plan.device_cap_bytes, (plan.gpu_used_bytes, plan.device_cap_bytes)
    defaults = [n for n in ("h2d_bytes_per_s", "gpu_mem_bytes_per_s", "disk_read_bytes_per_s")
                if hw.source(n) == "default"]
    if defaults:
        notes.append("uncalibrated link speeds (defaults): " + ", ".join(defaults)
                     + "; run the calibration for measured numbers")
    return plan
