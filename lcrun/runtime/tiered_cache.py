"""The tiered KV store behind the attention seam: GPU page cache over a pinned host pool.

Every page (P tokens of one KV head of one layer, K and V) has its home in the pinned host pool,
written through as tokens arrive; the GPU holds a direct-mapped cache of pages per layer, so an
eviction never writes back. Page abstracts (key min/max) stay on the GPU for every page.

Decode, per layer (no host synchronisation; per-step metadata built once in ``_plan``):
  score all full pages -> select sinks + window + top pages -> admit the missed pages into the
  GPU cache (one zero-copy read of each from pinned host memory) -> attend from GPU memory (a page
  that lost its cache slot to a direct-mapped conflict is copied to an overflow slot for this step
  only). Each missed page crosses PCIe once, and stays cached for the next steps.
The prefetcher runs on a side CUDA stream: while layer l computes, it scores layer l+1's pages
with a predicted query (as InfiniGen: layer l's input through layer l+1's norm and query
projection, which the residual stream makes close to layer l+1's real input) and admits the
predicted pages that are missing; layer l+1's attention waits for that admission only, never
for a host. A prefetched
page that is not then selected costs link bandwidth the demand fetches need, so with
``prefetch="auto"`` the first decode steps measure the prefetch's accuracy (the share of its
pages hit that step) and keep it only above PREFETCH_MIN_ACCURACY.

Prefill (layer by layer, into the tiers) and the page abstracts: ``lcrun.runtime.tiered_prefill``.

NVMe tier (``host_slots_per_layer`` below the pages of a layer, and ``kv_dir``): every step's
selection goes to the Promoter thread, which reads its pages that live only on NVMe into the host
pool (many reads in flight), so the next step -- whose selection is mostly the same -- finds them
there. Inside a step nothing waits for the disk: a selected page still on NVMe (host slot -1) is
unreadable, and the kernels treat it as empty. So after each decode step the caller asks
``settle_decode_step``: when the step found selected pages unreadable ("late"), the cache waits
for the promoter to bring that step's selection in (at most NVME_WAIT_MS per token,
LCRUN_NVME_WAIT_MS), maps the promoted pages, forgets the step's token and answers True, and the
caller runs the same step again (same token and position: writing the same K/V again and the
running min/max abstracts are idempotent), which now reads them. A redo can change what later
layers select, so a token is run at most 1 + NVME_MAX_REDOS times (LCRUN_NVME_MAX_REDOS); pages
still unreadable in the step that is kept are "skipped", and ``report`` counts both. Mapping
changes reach the GPU between steps.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from lcrun.errors import ConfigError
from lcrun.kernels import kernel_backend, plan_selection
from lcrun.kernels.chunk_abstracts import chunk_abstracts_like
from lcrun.kernels.tiered_reference import FP8_MAX
from lcrun.offload.host_pool import HostPagePool
from lcrun.offload.movers import Promoter, SpillWriter
from lcrun.offload.nvme_store import NvmeStore
from lcrun.offload.page_directory import PageDirectory
from lcrun.profiling.ranges import named_range
from lcrun.runtime.kv_cache import AttentionCache
from lcrun.runtime.model_config import ModelConfig
from lcrun.kernels.key_rotation import KeyRotation
from lcrun.runtime.paged_cache import resolve_chunk_pages
from lcrun.runtime.positions import PositionRule, decode_layout
from lcrun.runtime.rope import Rotary
from lcrun.runtime.tiered_prefill import TieredPrefill


def _tiered_ops(device: torch.device):
    """Triton kernels on CUDA (zero-copy host reads); their torch references elsewhere."""
    if device.type == "cuda":
        from lcrun.kernels import tiered as ops
    else:
        from lcrun.kernels import tiered_reference as ops
    return ops


# fp8 pages (kv_dtype): one power-of-two scale per layer, KV head and K/V, set from the first
# prompt's largest magnitude times this headroom (later tokens up to that size keep e4m3's 3
# mantissa bits; larger ones saturate at +-448 codes). e4m3 spans 2^15 between its smallest normal
# and its largest value, so the headroom costs nothing that matters: values below ~1/3500 of the
# largest key or value of a head round to the subnormal grid.
FP8_HEADROOM = 8.0


def fp8_scales(amax: torch.Tensor) -> torch.Tensor:
    """(..., 2) largest |K|, |V| -> (..., 4) [K scale, V scale, 1 / K scale, 1 / V scale]: powers of
    two, so encoding (x * inverse) and decoding (code * scale) are exact multiplications."""
    scale = torch.exp2(torch.ceil(torch.log2((amax.float() * FP8_HEADROOM / FP8_MAX).clamp(min=2.0 ** -20))))
    return torch.cat((scale, 1.0 / scale), dim=-1)


PREFETCH_PROBE_STEPS = 2       # decode steps that measure the prefetch in "auto" mode
# Below this accuracy the prefetch costs more than it saves: every wrong page takes the PCIe link
# from the demand fetches of the same step. With random weights the hidden-state predictor was
# 63-66% accurate (Llama-3.1-8B shape, 24 GiB cap: bench-h200-2026-11-29-llama8b-24gib.json,
# kernels-h200-512k-24gib.json in perf/results); on the H100 at 128K it made decode slower than
# no prefetch (a session measurement not kept as a results file).
PREFETCH_MIN_ACCURACY = 0.8

# NVMe tier (module docstring): how long one token may wait for late pages in all (ms), and how
# many times its step may run again. LCRUN_NVME_WAIT_MS and LCRUN_NVME_MAX_REDOS override them;
# a wait of 0 never redoes a step (late pages are skipped, as before settle_decode_step existed).
NVME_WAIT_MS = 200.0
NVME_MAX_REDOS = 3


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ConfigError(f"{name}={raw!r}: expected a number >= 0")
    return value


@dataclass
class TierStats:
    """Device-side counters (read once, at report time: no sync in the loop). ``counters`` is
    what the demand and speculative admission kernels add to (lcrun.kernels.tiered.admit_pages):
    selected pages, GPU cache hits, unreadable (on NVMe only, skipped that step), hits brought
    in by this step's speculative prefetch, pages the prefetch admitted."""
    counters: torch.Tensor
    decode_steps: int = 0
    prefill_bytes_h2d: int = 0
    prefill_nvme_read_bytes: int = 0
    prefill_nvme_pages_written: int = 0
    # NVMe tier, host side (settle_decode_step). ``counters`` and ``decode_steps`` count the run of
    # each token that was kept; a run done again is taken out of them and added to redo_counters.
    redone_steps: int = 0              # runs done again because they read pages that arrived late
    late_pages: int = 0                # settled tokens: selected pages unreadable in their first run
    skipped_settled: int = 0           # settled tokens: pages still unreadable in the kept run
    nvme_wait_s: float = 0.0           # time spent waiting for late pages
    redo_counters: tuple = (0, 0, 0, 0, 0)  # ``counters`` of the runs done again

    selected = property(lambda self: self.counters[0])
    hits = property(lambda self: self.counters[1])
    unreadable = property(lambda self: self.counters[2])
    prefetch_hits = property(lambda self: self.counters[3])
    prefetched = property(lambda self: self.counters[4])


class TieredTopKCache(TieredPrefill, AttentionCache):
    def __init__(self, cfg: ModelConfig, capacity: int, device, dtype, *, cache_slots_per_layer: int,
                 page_size: int = 32, budget: int = 2048, sink_tokens: int = 64, window_tokens: int = 512,
                 group_score: str = "max", prefill_block: int = 8192, prefetch: str = "auto",
                 backend: str = "auto", host_slots_per_layer: int | None = None, kv_dir: str | None = None,
                 nvme_slots: int | None = None, promotion_reserve: int | None = None,
                 sparse_prefill: bool = False, kv_dtype: torch.dtype | None = None,
                 chunk_pages: int | str = "auto", top_chunks: int = 32, positions: PositionRule = PositionRule(None)):
        """host_slots_per_layer: host pool pages per layer (default: every page of the context, no
        NVMe tier); below that, pages spill to NVMe files under ``kv_dir`` (``nvme_slots`` pages at
        most, default every page) and ``promotion_reserve`` host slots per layer are kept free for
        promotions and new pages. sparse_prefill: prefill chunks attend to sinks, window and their
        top pages within ``budget`` (see _sparse_chunk_attention) instead of the whole past.
        prefetch: speculative next-layer prefetch with the query predicted from the layer's input
        ("hidden", needs the model to call ``lookahead``) or the layer's own query ("layer"), "off",
        or "auto" (probe "hidden", then decide: module docstring); only on CUDA.
        kv_dtype: how pages are stored in the host pool, on NVMe and in the GPU page cache: the
        model dtype (default) or torch.float8_e4m3fn (half the bytes per page, so twice the pages
        per GPU byte and half the PCIe bytes per miss; per-head scales, see fp8_scales). Attention
        reads fp8 pages as code * scale; page abstracts are computed from the exact keys.
        chunk_pages, top_chunks: hierarchical selection as in PagedTopKCache (chunk abstracts of
        chunk_pages pages scored first, then the pages of the best top_chunks chunks); "auto": from
        AUTO_MIN_PAGES pages per KV head (256K tokens at page 32), flat below.
        positions: when queries move to window positions (lcrun.runtime.positions), as in
        PagedTopKCache: pages keep keys at true positions and the decode kernel rotates at read."""
        super().__init__(cfg, capacity, device, dtype)
        store = dtype if kv_dtype is None else kv_dtype
        if store not in (dtype, torch.float8_e4m3fn):
            raise ConfigError(f"KV pages are stored in the model dtype ({dtype}) or fp8 (e4m3), not {store}")
        if store == torch.float8_e4m3fn and self.device.type == "cuda" and \
                torch.cuda.get_device_capability(self.device) < (8, 9):
            name = torch.cuda.get_device_name(self.device)
            raise ConfigError(f"fp8 KV pages need a GPU with fp8 conversions (compute capability 8.9+: RTX 40xx, "
                              f"L4, H100); {name} has {torch.cuda.get_device_capability(self.device)}: "
                              f"use --kv-dtype auto")
        self.store_dtype = store
        if cache_slots_per_layer < 1:
            raise ConfigError("the GPU page cache needs at least one slot per layer")
        L, hkv, d, P = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, page_size
        self.page_size, self.budget = P, budget
        self.sink_tokens, self.window_tokens, self.group_score = sink_tokens, window_tokens, group_score
        self.prefill_block = max(P, prefill_block // P * P)
        self.sparse_prefill = sparse_prefill
        if prefetch not in ("auto", "hidden", "layer", "off"):
            raise ConfigError(f"prefetch must be auto, hidden, layer or off, got {prefetch!r}")
        self.prefetch_mode = prefetch
        self.prefetch = prefetch != "off" and self.device.type == "cuda"
        # How the next layer's query is predicted: from this layer's input through the next
        # layer's projection (hidden, InfiniGen), or this layer's own query (layer).
        self.predictor = "layer" if prefetch == "layer" else "hidden"
        self.prefetch_decision: str | None = None  # auto: why the probe kept or dropped it
        self.ops = kernel_backend(self.device, backend)
        self.tier_ops = _tiered_ops(self.device)
        self.sm_scale = 1.0 / math.sqrt(d)
        self.max_pages = -(-capacity // P)
        flat_pages = hkv * self.max_pages
        chunk_pages = resolve_chunk_pages(chunk_pages, self.max_pages, top_chunks)
        self.chunk_pages, self.top_chunks = chunk_pages, top_chunks
        cuda = self.device.type == "cuda"

        # Host homes: one pinned allocation, H slots per layer, K and V side by side in a slot.
        H = flat_pages if host_slots_per_layer is None else min(int(host_slots_per_layer), flat_pages)
        self.spills = H < flat_pages
        self.host_slots_per_layer = H
        elem = torch.tensor([], dtype=store).element_size()
        self.page_bytes = 2 * P * d * elem
        slot_bytes = -(-self.page_bytes // 4096) * 4096
        self.slot_bytes = slot_bytes
        self.host_pool = HostPagePool(L * H, slot_bytes)
        self.host_kv = self.host_pool.slots_view(store, (2, P, d)).view(L, H, 2, P, d)
        if self.spills:
            if kv_dir is None:
                self.host_pool.close()
                raise ConfigError(f"{H} host pages per layer hold less than the {flat_pages} pages of {capacity} "
                                  "tokens: set --kv-dir to a folder on an NVMe drive, or raise --host-mem")
            reserve = promotion_reserve if promotion_reserve is not None else 2 * hkv * max(1, budget // P)
            self.reserve = max(2 * hkv, min(int(reserve), H // 2))
            keep = (H - self.reserve) // hkv   # host pages per head after a prefill
            if keep < -(-sink_tokens // P) + -(-window_tokens // P) + 2:
                self.host_pool.close()
                raise ConfigError(f"{H} host pages per layer cannot hold the sinks and window of {hkv} KV heads "
                                  f"plus a promotion reserve of {self.reserve}: raise --host-mem")
            self.host_slot = torch.full((L, hkv, self.max_pages), -1, device=self.device, dtype=torch.int32)
            self.directory = PageDirectory(L, hkv, self.max_pages, H, nvme_slots or L * flat_pages)
            try:
                self.nvme = NvmeStore(kv_dir, slot_bytes, self.directory.nvme_slots)
            except BaseException:
                self.host_pool.close()
                raise
            self.writer = SpillWriter(self.nvme, 64 << 20, buffers=3, pin=cuda)
            host_rows = self.host_pool.slots_view(torch.uint8, (slot_bytes,)).view(L, H, slot_bytes)
            self.promoter = Promoter(self.directory, self.nvme, host_rows, reserve_per_layer=self.reserve,
                                     protected_fn=self._protected_flats, writer=self.writer, pin=cuda)
        else:
            # Every page has a fixed home: slot h * max_pages + p of its layer.
            self.host_slot = torch.arange(flat_pages, device=self.device, dtype=torch.int32).view(
                1, hkv, self.max_pages).repeat(L, 1, 1).contiguous()
            self.directory = self.nvme = self.writer = self.promoter = None

        # GPU: abstracts of every page, and the direct-mapped page cache.
        S = cache_slots_per_layer
        self.cache_slots = S
        # One allocation per K and V: L layers of S cache slots, then the overflow slots where a
        # decode step's demand admission puts pages that lost their slot to a conflict (one per
        # selection entry, shared by all layers: a layer's attention reads them right away).
        kmax = plan_selection(torch.ones(1, dtype=torch.int32), self.max_pages, P, sink_tokens, window_tokens,
                              budget, fold=True).kmax
        self._overflow = L * S
        self._pool_k = torch.zeros((L * S + hkv * kmax, P, d), device=self.device, dtype=store)
        self._pool_v = torch.zeros_like(self._pool_k)
        self.gpu_k = self._pool_k[:L * S].view(L, S, P, d)
        self.gpu_v = self._pool_v[:L * S].view(L, S, P, d)
        self._read_slot = torch.zeros((hkv, kmax), device=self.device, dtype=torch.int32)
        self._read_lens = torch.zeros_like(self._read_slot)
        self.tag = torch.full((L, S), -1, device=self.device, dtype=torch.int32)
        # Consecutive pages of a head take consecutive slots, heads offset from each other, so the
        # recent window and the sinks of all heads never collide while the cache holds a step.
        self.cache_slot = (torch.arange(flat_pages, device=self.device, dtype=torch.int64) % S).to(
            torch.int32).view(hkv, self.max_pages)
        # fp8 pages: per layer and KV head [K scale, V scale, 1/K, 1/V] (fp8_scales), set when
        # position 0 of a layer is written.
        self.kv_scale = (torch.ones((L, hkv, 4), device=self.device, dtype=torch.float32)
                         if store == torch.float8_e4m3fn else None)
        self.kmin = torch.zeros((L, hkv, self.max_pages, d), device=self.device, dtype=dtype)
        self.kmax = torch.zeros_like(self.kmin)
        self.positions = positions
        self._window_step = False  # this forward's decode query sits at window positions
        if positions.may_move:  # page-relative abstracts (positions module doc) and the step's layout
            self.rel_min, self.rel_max = torch.zeros_like(self.kmin), torch.zeros_like(self.kmin)
            self._layout = torch.zeros(3, device=self.device, dtype=torch.int32)
        if chunk_pages:
            self.cmin, self.cmax = chunk_abstracts_like(self.kmin, chunk_pages)
        # Selection maps pages through a table: the identity gives logical page ids.
        self.logical = torch.arange(self.max_pages, device=self.device, dtype=torch.int32)[None].expand(
            hkv, -1).contiguous()

        scalar = dict(device=self.device, dtype=torch.int32)
        self._start = torch.zeros(1, **scalar)
        self._seq_len = torch.zeros(1, **scalar)
        self._num_full = torch.zeros(1, **scalar)
        self._last_page = torch.zeros(1, **scalar)  # page the decode token lands in
        self.stats = TierStats(counters=torch.zeros(5, device=self.device, dtype=torch.int64))
        # The decode step's number, on the device (a replayed step counts itself), and per cache
        # slot the step whose speculative prefetch filled it: hits on those measure the prefetch.
        self._step = torch.zeros(1, **scalar)
        self.spec_mark = torch.full((L, S), -1, **scalar)
        self._layerwise = False
        self._sel_log: torch.Tensor | None = None   # (L, Hkv, Kmax) this step's selection, for the promoter
        self._mapped_through = 0                    # pages [0, this) of the context have host slots (spill mode)
        self._side_forked = False  # the side stream has work of this step to join
        if cuda:
            self.side = torch.cuda.Stream(self.device)
            self._prefetched = [torch.cuda.Event() for _ in range(L)]
            self._staged = [torch.cuda.Event() for _ in range(2)]
            self._consumed = [torch.cuda.Event() for _ in range(2)]
        else:
            self.side = None
        self._staging: list | None = None  # chunk-major prefill's stream buffers, made on first use
        # NVMe tier: settling decode steps (settle_decode_step).
        self.nvme_wait_s = _env_number("LCRUN_NVME_WAIT_MS", NVME_WAIT_MS) / 1e3
        self.nvme_max_redos = int(_env_number("LCRUN_NVME_MAX_REDOS", NVME_MAX_REDOS))
        self._counters_mark = torch.zeros_like(self.stats.counters)  # ``counters`` before this step
        self._settle_pending = False  # a decode step ran and was not settled yet
        self._sel_seq: int | None = None  # the promoter's number of this step's selection, if handed over
        self._redos = 0                # times the current token's step ran again
        self._redo_length = -1         # length after a redone step: the same token's
        self._settle_deadline = 0.0

    # -- per forward -----------------------------------------------------------------------------
    def _plan(self, positions: torch.Tensor) -> None:
        t = positions.numel()
        self._cos_sin = self.rotary.cos_sin(positions, self.dtype)
        self._pos = positions
        self._cross_stream_refs: list = []  # tensors (and closures holding them) the side stream reads
        if t == 1 and not self._layerwise:
            if self.spills:
                self._before_decode_step()
            if self.prefetch and self.prefetch_mode == "auto" and self.prefetch_decision is None and \
                    self.stats.decode_steps >= PREFETCH_PROBE_STEPS and not torch.cuda.is_current_stream_capturing():
                self.decide_prefetch()
            self._start.copy_(positions[:1])  # from the device: the step can be graph-captured
            self._step.add_(1)
            torch.add(self._start, 1, out=self._seq_len)
            torch.floor_divide(self._seq_len, self.page_size, out=self._num_full)
            torch.floor_divide(self._start, self.page_size, out=self._last_page)
            self._selection = plan_selection(self._seq_len, self.max_pages, self.page_size, self.sink_tokens,
                                             self.window_tokens, self.budget, self.ops.selection_bounds)
            self._window_step = self.positions.window_at(self.length)
            self._key_cos_sin = self._score_cos_sin = self._cos_sin
            if self._window_step:
                # Key written at its true position; the query at c - shift, scored at its distance
                # to the far pages (lcrun.runtime.positions).
                decode_layout(self._selection.bounds, self.page_size, self._layout)
                q_pos = positions - self._layout[2]
                self._cos_sin = self.rotary.cos_sin(q_pos, self.dtype)
                self._score_cos_sin = self.rotary.cos_sin(q_pos - self._layout[0], self.dtype)
            self._prefetched_into = [False] * self.cfg.num_layers
            self.stats.decode_steps += 1  # host count; replays add theirs in begin_replay
        elif self.spills and not self._layerwise:
            raise ConfigError("with an NVMe tier, prompts are prefilled layer by layer (begin_layerwise)")

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self._layerwise:
            return self._attend_layerwise(layer, q, k, v)
        k_pre = k
        if self._window_step and q.shape[0] == 1:
            k = Rotary.apply(k, *self._key_cos_sin)
            q_sel = Rotary.apply(q, *self._score_cos_sin)[0].contiguous()
            q = Rotary.apply(q, *self._cos_sin)
        else:
            q, k = Rotary.apply_qk(q, k, *self._cos_sin)
            q_sel = None
        k = k.to(self.dtype)
        v = v.to(self.dtype)
        t = q.shape[0]
        start = self.length if t > 1 else self._start
        if t == 1 and self.prefetch and self._prefetched_into[layer]:
            # This step's predicted admissions into this layer must land before the new token is
            # written through, or a page being admitted could miss the token (its host copy read
            # first, its tag set after the write checked it). Earlier steps' side work was joined
            # at the end of their forward.
            torch.cuda.current_stream(self.device).wait_event(self._prefetched[layer])
        with named_range("kv_write"):
            if self.length == 0:
                self._set_scales(layer, k, v, token_dim=0)
            # Decode: the page's running abstract is updated in the same launch (true-position
            # abstracts are read inside the trained window only).
            abstracts = (self.kmin[layer], self.kmax[layer]) if t == 1 and not self._window_step else (None, None)
            self.tier_ops.write_through(k, v, start, self.host_kv[layer], self.host_slot[layer], self.gpu_k[layer],
                                        self.gpu_v[layer], self.cache_slot, self.tag[layer], *abstracts,
                                        kv_scale=self.scales(layer))
            if t > 1:
                self._update_abstracts(layer, k)
            else:
                if self.positions.may_move:
                    self.ops.update_relative_abstract(k_pre[0].to(self.dtype), self.rotary.inv_freq, self.rel_min[layer],
                                             self.rel_max[layer], self._start, self.page_size)
                if self.chunk_pages:  # the token's chunk: it counts the page once the page is full
                    lo, hi = self._selection_abstracts(layer, self.positions.may_move)
                    self.ops.update_chunk_abstracts(lo, hi, self.cmin[layer], self.cmax[layer], self._last_page,
                                                    self._num_full, self.chunk_pages)
        if t > 1:
            return self._prefill_attention(layer, q, k, v)
        return self._decode_attention(layer, q[0].contiguous(), q_sel)[None]

    def _selection_abstracts(self, layer: int, relative: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Page abstracts that rank pages: page-relative ones for window positions."""
        return (self.rel_min[layer], self.rel_max[layer]) if relative else (self.kmin[layer], self.kmax[layer])

    def _hierarchical(self) -> bool:
        """Chunk abstracts follow the page-relative abstracts when positions may move."""
        return bool(self.chunk_pages) and (self._window_step or not self.positions.may_move)

    def shares_prefill_selection(self, end: int) -> bool:
        """Sparse prefill selects once per chunk, window prefill once per block of queries."""
        return self.sparse_prefill or self.positions.window_at(end - 1)

    def decode_graph_key(self) -> object:
        return "window" if self.positions.window_at(self.length) else "true"

    def scales(self, layer: int) -> torch.Tensor | None:
        """The layer's (Hkv, 4) fp8 scales, or None when pages are stored in the model dtype."""
        return None if self.kv_scale is None else self.kv_scale[layer]

    def _set_scales(self, layer: int, k: torch.Tensor, v: torch.Tensor, token_dim: int) -> None:
        """fp8 pages: the layer's scales from the first K/V written at position 0 (tokens along
        ``token_dim``, KV heads along the other leading dim)."""
        if self.kv_scale is None:
            return
        dims = (token_dim, 2)

        def largest(x: torch.Tensor) -> torch.Tensor:  # max |x| without an |x| copy (a whole layer at 512K)
            return torch.maximum(x.amax(dim=dims), -x.amin(dim=dims))
        amax = torch.stack((largest(k), largest(v)), dim=-1)  # (Hkv, 2)
        self.kv_scale[layer].copy_(fp8_scales(amax))

    # -- decode ------------------------------------------------------------------------------------
    def _select(self, layer: int, q1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logical pages and lengths of sinks, window and top pages for scoring query q1."""
        plan = self._selection
        kmin, kmax = self._selection_abstracts(layer, self._window_step)
        if self._hierarchical():
            with named_range("topk"):
                return self.ops.select_top_pages_hier(q1, kmin, kmax, self.cmin[layer], self.cmax[layer],
                                                      self._num_full, self.logical, plan,
                                                      self.chunk_pages, self.top_chunks, self.group_score)
        with named_range("score"):
            scores = self.ops.score_pages(q1, kmin, kmax, self._num_full, self.group_score, candidates=plan.bounds)
        with named_range("topk"):  # the identity table makes the selected "slots" logical page ids
            return self.ops.select_top_pages(scores, self.logical, plan, masked=True)

    def _admit(self, layer: int, pages: torch.Tensor, lens: torch.Tensor, speculative: bool = False) -> None:
        """Selected pages missing from the GPU cache come in from the host pool; the kernel also
        counts hits (demand) or marks what it prefetched (speculative)."""
        self.tier_ops.admit_pages(pages, lens, self.cache_slot, self.tag[layer], self.host_slot[layer],
                                  self.host_kv[layer], self.gpu_k[layer], self.gpu_v[layer],
                                  self.stats.counters, self.spec_mark[layer], self._step, speculative)

    def _admit_for_attention(self, layer: int, pages: torch.Tensor, lens: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Demand admission that also maps every readable selected page to a GPU slot for this
        step (conflict losers into the overflow slots). Returns the layer's pool (K, V: its cache
        slots onwards, overflow included) and the (slots, lens) to attend over."""
        S = self.cache_slots
        pool_k, pool_v = self._pool_k[layer * S:], self._pool_v[layer * S:]
        self.tier_ops.admit_pages(pages, lens, self.cache_slot, self.tag[layer], self.host_slot[layer],
                                  self.host_kv[layer], pool_k, pool_v, self.stats.counters, self.spec_mark[layer],
                                  self._step, False, self._read_slot, self._read_lens, self._overflow - layer * S)
        return pool_k, pool_v, self._read_slot, self._read_lens

    def _log_selection(self, layer: int, pages: torch.Tensor, lens: torch.Tensor) -> None:
        """The promoter's input (NVMe tier): this step's selection, read after the step."""
        if self._sel_log is None:
            self._sel_log = torch.full((self.cfg.num_layers, *pages.shape), -1, device=self.device, dtype=torch.int32)
        self._sel_log[layer].copy_(torch.where(lens > 0, pages, -1))

    def _decode_attention(self, layer: int, q1: torch.Tensor, q_sel: torch.Tensor | None = None) -> torch.Tensor:
        """q1: the post-RoPE query; q_sel: a window step's scoring query (None: q1 scores)."""
        pages, lens = self._select(layer, q1 if q_sel is None else q_sel)
        if self.spills:
            self._log_selection(layer, pages, lens)
        # Demand admission first, then attention from GPU memory only: each missed page crosses
        # PCIe once (attending zero-copy and admitting afterwards read it twice), and no
        # attention program waits on a host read.
        with named_range("fetch.host"):
            pool_k, pool_v, slots, read_lens = self._admit_for_attention(layer, pages, lens)
        with named_range("attend"):
            rotation = KeyRotation(self.rotary.inv_freq, pages, 0, self._layout) if self._window_step else None
            out = self.ops.sparse_decode_attention(q1, pool_k, pool_v, slots, read_lens, self.sm_scale,
                                                   kv_scale=self.scales(layer), rotation=rotation)
        if self.prefetch and self.predictor == "layer" and layer + 1 < self.cfg.num_layers:
            sel_q = q1 if q_sel is None else q_sel
            self._speculate(layer + 1, lambda: sel_q)
        return out

    def wants_lookahead(self, layer: int) -> bool:
        return (self.prefetch and self.predictor == "hidden" and self._pending == 1 and not self._layerwise
                and layer + 1 < self.cfg.num_layers)

    def lookahead(self, layer: int, predict_next_query: Callable[[], torch.Tensor]) -> None:
        """Before layer l's attention: predict layer l+1's query from layer l's input and
        prefetch its pages while layer l runs (the longest overlap a prediction allows)."""
        cos, sin = self._score_cos_sin  # scored as the next layer's selection will be

        def query() -> torch.Tensor:
            return Rotary.apply(predict_next_query(), cos, sin)[0].contiguous()
        self._speculate(layer + 1, query)
        self._cross_stream_refs.append(predict_next_query)  # holds the main-stream hidden state

    def _speculate(self, layer: int, query: Callable[[], torch.Tensor]) -> None:
        """On the side stream: select layer ``layer``'s pages with a predicted query and admit the
        missing ones; that layer's attention waits for this (an event), never for a host."""
        main = torch.cuda.current_stream(self.device)
        self.side.wait_stream(main)
        self._side_forked = True
        with torch.cuda.stream(self.side):
            with named_range("prefetch"):
                q = query()
                spec_pages, spec_lens = self._select(layer, q)
                self._admit(layer, spec_pages, spec_lens, speculative=True)
            self._prefetched_into[layer] = True
            self._prefetched[layer].record(self.side)
        # Tensors made on the main stream and read on the side stream stay referenced until the
        # streams join at the end of the step: freed earlier, the allocator could hand their
        # memory to a later main-stream tensor while the side stream still reads it (inside a
        # CUDA-graph capture record_stream does not protect them).
        self._cross_stream_refs += (spec_pages, spec_lens, q)

    def decide_prefetch(self) -> None:
        """auto mode, after the probe steps (one sync): keep the speculative prefetch only if at
        least PREFETCH_MIN_ACCURACY of the pages it admitted were hits in the same step. Called
        before a decode step is captured as a CUDA graph (DecodeStepper) or from _plan."""
        if self.prefetch_mode != "auto" or self.prefetch_decision is not None or not self.prefetch:
            return
        fetched, used = int(self.stats.prefetched), int(self.stats.prefetch_hits)
        if fetched == 0:
            return  # nothing measured yet (no steps, or everything already cached): decide later
        accuracy = used / fetched
        self.prefetch = accuracy >= PREFETCH_MIN_ACCURACY
        self.prefetch_decision = (f"{'kept' if self.prefetch else 'off'}: {accuracy:.0%} of {fetched} "
                                  f"prefetched pages were used (threshold {PREFETCH_MIN_ACCURACY:.0%})")

    before_capture = decide_prefetch

    # -- NVMe tier: between decode steps -----------------------------------------------------------
    def _protected_flats(self, length: int) -> np.ndarray:
        """Pages never evicted from the host pool: sinks, the local window, the page being written
        and the next one (flat ids, the same for every layer)."""
        P = self.page_size
        pages = np.arange(self.max_pages)
        keep = (pages < -(-self.sink_tokens // P)) | (pages >= max(0, (length - self.window_tokens) // P - 1))
        return np.tile(keep, self.cfg.num_kv_heads)

    def _set_host_slots(self, layer: int, flats: np.ndarray, slots: np.ndarray) -> None:
        idx = torch.from_numpy(np.ascontiguousarray(flats, dtype=np.int64)).to(self.device)
        val = torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int32)).to(self.device)
        self.host_slot[layer].view(-1)[idx] = val

    def _map_pages_through(self, end_page: int) -> None:
        """Give pages [mapped, end_page) of every layer and head a host slot (new pages of decode)."""
        if end_page <= self._mapped_through:
            return
        pages = np.arange(self._mapped_through, min(end_page, self.max_pages))
        d = self.directory
        for layer in range(self.cfg.num_layers):
            flats = (np.arange(self.cfg.num_kv_heads)[:, None] * self.max_pages + pages[None, :]).ravel()
            with d.lock:
                flats = flats[d.host_map[layer, flats] < 0]
                slots = d.assign_host(layer, flats)
            self._set_host_slots(layer, flats, slots)
        self._mapped_through = end_page

    def _apply_promotions(self) -> int:
        """Apply the promoter's mapping changes; returns how many pages gained a host slot."""
        updates = self.promoter.drain()
        promoted = 0
        for layer, flats, slots, released in updates:
            self._set_host_slots(layer, flats, slots)
            if released is not None:
                event = torch.cuda.Event() if self.device.type == "cuda" else None
                if event is not None:
                    event.record()  # after the unmap: once it completes no step reads the old pages
                self.promoter.released(event, layer, released)
            else:
                promoted += len(flats)
        return promoted

    def _before_decode_step(self) -> None:
        """Host work between steps (never inside a capture): apply promotions and evictions, and
        map the page this step writes and the next one (a captured step skips this hook); note
        the counters before the step (settle_decode_step reads what the step added)."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return
        self._apply_promotions()
        self._map_pages_through(-(-(self.length + 2) // self.page_size))
        self._counters_mark.copy_(self.stats.counters)

    def _after_decode_step(self) -> None:
        """Hand this step's selection to the promoter (copied to pinned memory, no wait)."""
        self._sel_seq = None
        if self._sel_log is None or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return  # a captured step: settle_decode_step hands it over after the replay
        self._sel_seq = self._submit_selection(0.0)
        if self._sel_seq is None:
            self.promoter.stats.steps_dropped += 1

    def _submit_selection(self, timeout: float) -> int | None:
        """Copy the last step's selection to a free promoter buffer (waiting up to ``timeout`` s
        for one) and hand it over; its number, or None when no buffer came free."""
        if not self.promoter.sel_buffers:
            self.promoter.start(tuple(self._sel_log.shape))
        buf = self.promoter.free_buffer(timeout)
        if buf is None:
            return None
        host = self.promoter.sel_buffers[buf]
        host.copy_(self._sel_log, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return self.promoter.submit(self.stats.decode_steps, self.length, buf, event)

    def settle_decode_step(self) -> bool:
        """After each decode step (one host sync, a read of five counters): True when the step
        read selected pages that were still on NVMe and must run again. The cache has then waited
        for the promoter to bring them into the host pool, mapped them and forgotten the step's
        token (``length`` is one less): the caller runs the same token at the same position again
        and settles again. False: keep the step's result (every selected page was read, or the
        wait bound or NVME_MAX_REDOS was reached: the pages left unreadable count as skipped)."""
        if not self._settle_pending or not self.spills:
            return False
        self._settle_pending = False
        if self._sel_log is None:
            return False
        now, mark = self.stats.counters.tolist(), self._counters_mark.tolist()
        unreadable = now[2] - mark[2]
        if self._redos and self.length != self._redo_length:
            self._redos = 0  # the redone token was abandoned: this step is a new token's
        if not self._redos:  # the token's first run
            self.stats.late_pages += unreadable
            self._settle_deadline = time.perf_counter() + self.nvme_wait_s
        if (unreadable and self.nvme_wait_s > 0 and self._redos < self.nvme_max_redos
                and self._wait_for_promotions() and self._apply_promotions()):
            self.stats.redo_counters = tuple(r + a - b for r, a, b in zip(self.stats.redo_counters, now, mark))
            self.stats.counters.copy_(self._counters_mark)  # the run again counts the step
            self.stats.decode_steps -= 1
            self.stats.redone_steps += 1
            self._redos += 1
            self.truncate(self.length - 1)
            self._redo_length = self.length + 1
            return True
        self.stats.skipped_settled += unreadable
        self._redos = 0
        self._counters_mark.copy_(self.stats.counters)
        return False

    def _wait_for_promotions(self) -> bool:
        """Wait, until the token's deadline, for the promoter to queue the promotions of the last
        step's selection (handed over now if it was not after the step); whether it did."""
        t0 = time.perf_counter()
        try:
            if self._sel_seq is None:  # the promoter was behind, or the step was a graph capture
                self._sel_seq = self._submit_selection(max(0.0, self._settle_deadline - t0))
            return (self._sel_seq is not None
                    and self.promoter.wait_promoted(self._sel_seq, self._settle_deadline - time.perf_counter()))
        finally:
            self.stats.nvme_wait_s += time.perf_counter() - t0

    def _late_pages(self, skipped: int) -> int:
        """Late pages of every token: settled ones, plus the skipped pages of steps nobody settled."""
        return self.stats.late_pages + skipped - self.stats.skipped_settled

    def _nvme_decode_report(self, selected: int, skipped: int, steps: int) -> dict:
        late = self._late_pages(skipped)
        return {"late_pages": late, "late_pages_per_token": late / steps,
                "late_fraction": late / selected if selected else None,
                "skipped_pages": skipped, "skipped_pages_per_token": skipped / steps,
                "redone_steps": self.stats.redone_steps, "redone_steps_per_token": self.stats.redone_steps / steps,
                "nvme_wait_ms_per_token": 1e3 * self.stats.nvme_wait_s / steps,
                "nvme_wait_bound_ms": 1e3 * self.nvme_wait_s if self.spills else None,
                "nvme_max_redos": self.nvme_max_redos if self.spills else None}

    # -- bookkeeping -------------------------------------------------------------------------------
    graph_safe_decode = True  # every per-step quantity of a decode step lives on the device

    def end_forward(self) -> None:
        if self._side_forked:  # join the side stream: a step's work ends with the step
            torch.cuda.current_stream(self.device).wait_stream(self.side)
        # Joined only when forked: inside a graph capture, waiting on a stream the capture never
        # forked is an error.
        self._side_forked = False
        self._cross_stream_refs = []
        decode = self._pending == 1 and not self._layerwise
        if self._layerwise:
            self._layerwise = False
            self._lw_k = self._lw_v = None
        super().end_forward()
        self._settle_pending = decode and self.spills
        if decode and self.spills:
            self._after_decode_step()

    def begin_replay(self, n: int) -> None:
        if self.spills:
            self._before_decode_step()
        super().begin_replay(n)
        self.stats.decode_steps += 1

    def truncate(self, length: int) -> None:
        """Forget tokens from ``length`` on. Their K/V stay where they were written and are written
        again (the same bytes for the same token) when the position is decoded anew."""
        self.length = min(self.length, length)

    def memory_bytes(self) -> int:
        gpu = (self.gpu_k, self.gpu_v, self.tag, self.cache_slot, self.kmin, self.kmax, self.host_slot, self.logical)
        gpu += (self.kv_scale,) if self.kv_scale is not None else ()
        gpu += (self.cmin, self.cmax) if self.chunk_pages else ()
        gpu += (self.rel_min, self.rel_max) if self.positions.may_move else ()
        staging = sum(t.numel() * t.element_size() for pair in (self._staging or []) for t in pair)
        return sum(t.numel() * t.element_size() for t in gpu) + staging

    def host_bytes(self) -> int:
        return self.host_pool.nbytes

    def report(self) -> dict:
        """Hit rate and bytes moved (one sync: call after a run, not inside it)."""
        selected = int(self.stats.selected)
        hits = int(self.stats.hits)
        skipped = int(self.stats.unreadable)
        page_bytes, steps = self.page_bytes, max(1, self.stats.decode_steps)
        redo = self.stats.redo_counters
        # decode_steps, selected_pages, cache_hits: the kept run of each token (a step run again
        # for late pages counts once; the runs done again are in redone_steps and the redo bytes).
        out = {"decode_steps": self.stats.decode_steps, "selected_pages": selected, "cache_hits": hits,
               "hit_rate": hits / selected if selected else None,
               "h2d_bytes_per_token_attention": (selected - hits) * page_bytes / steps,
               "h2d_bytes_per_token_redo": (redo[0] - redo[1] - redo[2]) * page_bytes / steps,
               "prefetched_pages": int(self.stats.prefetched), "prefetch_hits": int(self.stats.prefetch_hits),
               "prefetch_accuracy": (int(self.stats.prefetch_hits) / int(self.stats.prefetched)
                                     if int(self.stats.prefetched) else None),
               "prefetch": self.prefetch_mode, "prefetch_decision": self.prefetch_decision,
               "h2d_bytes_per_token_prefetch": int(self.stats.prefetched) * page_bytes / steps,
               "prefill_h2d_bytes": self.stats.prefill_bytes_h2d,
               "selection": f"hierarchical {self.chunk_pages}x{self.top_chunks}" if self.chunk_pages else "flat",
               "gpu_cache_slots_per_layer": self.cache_slots, "kv_dtype": str(self.store_dtype).replace("torch.", ""),
               "host_pool_bytes": self.host_pool.nbytes,
               "host_slots_per_layer": self.host_slots_per_layer, "pinned": self.host_pool.pinned}
        out.update(self._nvme_decode_report(selected, skipped, steps))
        if self.spills:
            self.promoter.wait_idle()
            self.writer.flush()
            ps = self.promoter.stats
            unreadable = skipped  # selected pages not read by the kept run of their step
            out.update({
                "nvme_direct_io": self.nvme.direct_io, "nvme_pages": self.directory.nvme_pages,
                "nvme_bytes_written": self.nvme.bytes_written, "nvme_bytes_read": self.nvme.bytes_read,
                "prefill_nvme_pages_written": self.stats.prefill_nvme_pages_written,
                "prefill_nvme_read_bytes": self.stats.prefill_nvme_read_bytes,
                "decode_nvme_read_bytes_per_token": ps.nvme_read_bytes / steps,
                "decode_nvme_write_bytes_per_token": ps.nvme_write_bytes / steps,
                "promoted_pages": ps.promoted_pages, "evicted_pages": ps.evicted_pages,
                "unreadable_selected_pages": unreadable,
                "unreadable_fraction": unreadable / selected if selected else None,
                "promoter_steps_seen": ps.steps_seen, "promoter_steps_dropped": ps.steps_dropped,
                "promoter_busy_s": ps.busy_s, "nvme_io_threads": self.nvme.io_threads})
        return out

    def step_counters(self) -> dict:
        """Cumulative counters for lcrun profile (synchronises: call between steps)."""
        selected, hits = int(self.stats.selected), int(self.stats.hits)
        unreadable = int(self.stats.unreadable)  # skipped: not read by the kept run of their step
        redo = self.stats.redo_counters
        late = self._late_pages(unreadable)
        # selected_pages .. host_reads: the kept run of each token; nvme_reads: selected pages found
        # only on NVMe by a token's first run (late: read from disk for a run again, or skipped);
        # h2d_bytes also counts the host reads of runs done again.
        out = {"selected_pages": selected, "gpu_hits": hits, "host_reads": selected - hits - unreadable,
               "prefetched_pages": int(self.stats.prefetched), "prefetch_hits": int(self.stats.prefetch_hits),
               "nvme_reads": late,
               "h2d_bytes": (selected - hits - unreadable + redo[0] - redo[1] - redo[2]) * self.page_bytes,
               "pages_gpu": int((self.tag >= 0).sum()), "late_pages": late, "skipped_pages": unreadable,
               "redone_steps": self.stats.redone_steps, "nvme_wait_ms": 1e3 * self.stats.nvme_wait_s}
        if self.spills:
            d = self.directory
            out.update({"nvme_read_bytes": self.promoter.stats.nvme_read_bytes,
                        "pages_host": int((d.host_map >= 0).sum()), "pages_nvme": d.nvme_pages})
        else:
            out["pages_host"] = self.cfg.num_layers * self.cfg.num_kv_heads * -(-self.length // self.page_size)
        return out

    def close(self) -> None:
        if self.spills:
            for closer in (self.promoter.close, self.writer.close, self.nvme.close):
                try:
                    closer()
                except Exception:
                    pass
        self.host_pool.close()
