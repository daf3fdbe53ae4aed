"""The tiered KV store behind the attention seam: GPU page cache over a pinned host pool.

Every page (P tokens of one KV head of one layer, K and V) has its home in the pinned host pool,
written through as tokens arrive; the GPU holds a direct-mapped cache of pages per layer, so an
eviction never writes back. Page abstracts (key min/max) stay on the GPU for every page.

Decode, per layer (no host synchronisation; per-step metadata built once in ``_plan``):
  score all full pages -> select sinks + window + top pages -> admit the missed pages into the
  GPU cache (one zero-copy read of each from pinned host memory) -> attend from the cache (a page
  that lost its cache slot to a direct-mapped conflict is read from the host in place). Each
  missed page crosses PCIe once, and stays cached for the next steps.
The prefetcher runs on a side CUDA stream: while layer l computes, it scores layer l+1's pages
with a predicted query (as InfiniGen: layer l's input through layer l+1's norm and query
projection, which the residual stream makes close to layer l+1's real input) and admits the
predicted pages that are missing; layer l+1's attention waits for that admission only, never
for a host. A prefetched
page that is not then selected costs link bandwidth the demand fetches need, so with
``prefetch="auto"`` the first decode steps measure the prefetch's accuracy (the share of its
pages hit that step) and keep it only above PREFETCH_MIN_ACCURACY.

Prefill runs layer by layer (``begin_layerwise``; the model drives it through
``LlamaModel.forward_layerwise``): all chunks of the prompt pass layer 0, then layer 1, and so on.
One layer's K/V for the whole context sits in a staging area carved from the GPU page cache
(unused while prefilling), so each chunk attends exactly to everything before it with flash
attention, and each layer's past is read from the host (or NVMe) once, not once per chunk. At the
end of a layer its new pages go to their homes: the host pool, or -- when the host cap is smaller
than the KV cache -- NVMe for the pages between the sinks and the most recent ones (written by a
background thread while the next layer computes).

NVMe tier (``host_slots_per_layer`` below the pages of a layer, and ``kv_dir``): a page selected
in decode that lives only on NVMe is skipped that step (the kernels treat host slot -1 as empty)
and promoted into the host pool by the Promoter thread from that step's selection, so the next
step reads it; the decode step itself never waits for the disk. Mapping changes reach the GPU
between steps. The older chunk-major path (``attend`` with T > 1 outside ``begin_layerwise``,
the past streamed from the host in double-buffered blocks) remains for host-only stores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from lcrun.errors import ConfigError
from lcrun.kernels import kernel_backend, plan_selection
from lcrun.kernels.attention_lse import RunningAttention, attention_with_lse
from lcrun.offload.host_pool import HostPagePool
from lcrun.offload.movers import Promoter, SpillWriter
from lcrun.offload.nvme_store import NvmeStore
from lcrun.offload.page_directory import PageDirectory
from lcrun.profiling.ranges import named_range
from lcrun.runtime.kv_cache import AttentionCache, _chunk_attention
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.rope import Rotary


def _tiered_ops(device: torch.device):
    """Triton kernels on CUDA (zero-copy host reads); their torch references elsewhere."""
    if device.type == "cuda":
        from lcrun.kernels import tiered as ops
    else:
        from lcrun.kernels import tiered_reference as ops
    return ops


PREFETCH_PROBE_STEPS = 2       # decode steps that measure the prefetch in "auto" mode
# Below this accuracy the prefetch costs more than it saves: measured on the H100 (Llama-3.1-8B
# shape, random weights, 128K, 24 GiB cap), the hidden-state predictor was 58% accurate, cut
# demand fetches from 114 to 49 MB/token but fetched 97 MB/token itself (link and side-stream
# work competing with the step): 10.5 ms/token against 9.4 without it.
PREFETCH_MIN_ACCURACY = 0.8


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

    selected = property(lambda self: self.counters[0])
    hits = property(lambda self: self.counters[1])
    unreadable = property(lambda self: self.counters[2])
    prefetch_hits = property(lambda self: self.counters[3])
    prefetched = property(lambda self: self.counters[4])


class TieredTopKCache(AttentionCache):
    def __init__(self, cfg: ModelConfig, capacity: int, device, dtype, *, cache_slots_per_layer: int,
                 page_size: int = 32, budget: int = 2048, sink_tokens: int = 64, window_tokens: int = 512,
                 group_score: str = "max", prefill_block: int = 8192, prefetch: str = "auto",
                 backend: str = "auto", host_slots_per_layer: int | None = None, kv_dir: str | None = None,
                 nvme_slots: int | None = None, promotion_reserve: int | None = None,
                 sparse_prefill: bool = False):
        """host_slots_per_layer: host pool pages per layer (default: every page of the context, no
        NVMe tier); below that, pages spill to NVMe files under ``kv_dir`` (``nvme_slots`` pages at
        most, default every page) and ``promotion_reserve`` host slots per layer are kept free for
        promotions and new pages. sparse_prefill: prefill chunks attend to sinks, window and their
        top pages within ``budget`` (see _sparse_chunk_attention) instead of the whole past.
        prefetch: speculative next-layer prefetch with the query predicted from the layer's input
        ("hidden", needs the model to call ``lookahead``) or the layer's own query ("layer"), "off",
        or "auto" (probe "hidden", then decide: module docstring); only on CUDA."""
        super().__init__(cfg, capacity, device, dtype)
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
        cuda = self.device.type == "cuda"

        # Host homes: one pinned allocation, H slots per layer, K and V side by side in a slot.
        H = flat_pages if host_slots_per_layer is None else min(int(host_slots_per_layer), flat_pages)
        self.spills = H < flat_pages
        self.host_slots_per_layer = H
        elem = torch.tensor([], dtype=dtype).element_size()
        slot_bytes = -(-2 * P * d * elem // 4096) * 4096
        self.slot_bytes = slot_bytes
        self.host_pool = HostPagePool(L * H, slot_bytes)
        self.host_kv = self.host_pool.slots_view(dtype, (2, P, d)).view(L, H, 2, P, d)
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
        self._pool_k = torch.zeros((L * S + hkv * kmax, P, d), device=self.device, dtype=dtype)
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
        self.kmin = torch.zeros((L, hkv, self.max_pages, d), device=self.device, dtype=dtype)
        self.kmax = torch.zeros_like(self.kmin)
        # Selection maps pages through a table: the identity gives logical page ids.
        self.logical = torch.arange(self.max_pages, device=self.device, dtype=torch.int32)[None].expand(
            hkv, -1).contiguous()

        scalar = dict(device=self.device, dtype=torch.int32)
        self._start = torch.zeros(1, **scalar)
        self._seq_len = torch.zeros(1, **scalar)
        self._num_full = torch.zeros(1, **scalar)
        self.stats = TierStats(counters=torch.zeros(5, device=self.device, dtype=torch.int64))
        # The decode step's number, on the device (a replayed step counts itself), and per cache
        # slot the step whose speculative prefetch filled it: hits on those measure the prefetch.
        self._step = torch.zeros(1, **scalar)
        self.spec_mark = torch.full((L, S), -1, **scalar)
        self._layerwise = False
        self._sel_log: torch.Tensor | None = None   # (L, Hkv, Kmax) this step's selection, for the promoter
        self._mapped_through = 0                    # pages [0, this) of the context have host slots (spill mode)
        if cuda:
            self.side = torch.cuda.Stream(self.device)
            self._side_forked = False
            self._prefetched = [torch.cuda.Event() for _ in range(L)]
            self._staged = [torch.cuda.Event() for _ in range(2)]
            self._consumed = [torch.cuda.Event() for _ in range(2)]
        else:
            self.side = None
            self._side_forked = False
        self._staging: list | None = None  # chunk-major prefill's stream buffers, made on first use

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
            self._selection = plan_selection(self._seq_len, self.max_pages, self.page_size, self.sink_tokens,
                                             self.window_tokens, self.budget, self.ops.selection_bounds)
            self._prefetched_into = [False] * self.cfg.num_layers
            self.stats.decode_steps += 1  # host count; replays add theirs in begin_replay
        elif self.spills and not self._layerwise:
            raise ConfigError("with an NVMe tier, prompts are prefilled layer by layer (begin_layerwise)")

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self._layerwise:
            return self._attend_layerwise(layer, q, k, v)
        cos, sin = self._cos_sin
        q, k = Rotary.apply_qk(q, k, cos, sin)
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
            # Decode: the page's running abstract is updated in the same launch.
            abstracts = (self.kmin[layer], self.kmax[layer]) if t == 1 else (None, None)
            self.tier_ops.write_through(k, v, start, self.host_kv[layer], self.host_slot[layer], self.gpu_k[layer],
                                        self.gpu_v[layer], self.cache_slot, self.tag[layer], *abstracts)
            if t > 1:
                self._update_abstracts(layer, k)
        if t > 1:
            return self._prefill_attention(layer, q, k, v)
        return self._decode_attention(layer, q[0].contiguous())[None]

    # -- abstracts ---------------------------------------------------------------------------------
    def _update_abstracts(self, layer: int, k: torch.Tensor) -> None:
        """Running per-page key min/max of the pages a prefill chunk's tokens land in (a page
        restarts its running values at its first token), so a page's abstract is right the step
        it fills. (A decode token's page is updated by write_through.)"""
        P, t = self.page_size, k.shape[0]
        kmin, kmax = self.kmin[layer], self.kmax[layer]
        pos = self._pos
        first = pos[:1] // P                                          # device, no sync
        n = (self.length + t - 1) // P - self.length // P + 1         # pages touched (host arithmetic)
        page_ids = first + torch.arange(n, device=self.device)
        local = (pos // P - first)[None, :, None].expand(self.cfg.num_kv_heads, t, self.cfg.head_dim)
        kt = k.transpose(0, 1)
        tmp_min = torch.full((self.cfg.num_kv_heads, n, self.cfg.head_dim), float("inf"), device=self.device,
                             dtype=self.dtype).scatter_reduce_(1, local, kt, "amin")
        tmp_max = torch.full_like(tmp_min, float("-inf")).scatter_reduce_(1, local, kt, "amax")
        continuing = ((torch.arange(n, device=self.device) == 0) & (pos[0] % P != 0))[None, :, None]
        kmin.index_copy_(1, page_ids, torch.where(continuing, torch.minimum(kmin.index_select(1, page_ids), tmp_min),
                                                  tmp_min))
        kmax.index_copy_(1, page_ids, torch.where(continuing, torch.maximum(kmax.index_select(1, page_ids), tmp_max),
                                                  tmp_max))

    def _abstracts_from_staging(self, layer: int, first_page: int, end: int) -> None:
        """Min/max of pages first_page .. ceil(end / P) - 1 from the staged keys (the staged past
        covers the part of a continuing page written by an earlier prompt)."""
        P, hkv, d = self.page_size, self.cfg.num_kv_heads, self.cfg.head_dim
        full = end // P
        if full > first_page:
            keys = self._lw_k[:, first_page * P:full * P].reshape(hkv, full - first_page, P, d)
            self.kmin[layer, :, first_page:full] = keys.amin(2)
            self.kmax[layer, :, first_page:full] = keys.amax(2)
        if end % P:
            keys = self._lw_k[:, full * P:end]
            self.kmin[layer, :, full] = keys.amin(1)
            self.kmax[layer, :, full] = keys.amax(1)

    # -- decode ------------------------------------------------------------------------------------
    def _select(self, layer: int, q1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self._selection
        with named_range("score"):
            scores = self.ops.score_pages(q1, self.kmin[layer], self.kmax[layer], self._num_full, self.group_score,
                                          candidates=plan.bounds)
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

    def _decode_attention(self, layer: int, q1: torch.Tensor) -> torch.Tensor:
        pages, lens = self._select(layer, q1)
        main = torch.cuda.current_stream(self.device) if self.side is not None else None
        if self.spills:
            self._log_selection(layer, pages, lens)
        # Demand admission first, then attention from GPU memory only: each missed page crosses
        # PCIe once (attending zero-copy and admitting afterwards read it twice), and no
        # attention program waits on a host read.
        with named_range("fetch.host"):
            pool_k, pool_v, slots, read_lens = self._admit_for_attention(layer, pages, lens)
        with named_range("attend"):
            out = self.ops.sparse_decode_attention(q1, pool_k, pool_v, slots, read_lens, self.sm_scale)
        if self.prefetch and self.predictor == "layer" and layer + 1 < self.cfg.num_layers:
            self._speculate(layer + 1, lambda: q1)
        return out

    def wants_lookahead(self, layer: int) -> bool:
        return (self.prefetch and self.predictor == "hidden" and self._pending == 1 and not self._layerwise
                and layer + 1 < self.cfg.num_layers)

    def lookahead(self, layer: int, predict_next_query: Callable[[], torch.Tensor]) -> None:
        """Before layer l's attention: predict layer l+1's query from layer l's input and
        prefetch its pages while layer l runs (the longest overlap a prediction allows)."""
        cos, sin = self._cos_sin

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

    def _apply_promotions(self) -> None:
        updates = self.promoter.drain()
        for layer, flats, slots, released in updates:
            self._set_host_slots(layer, flats, slots)
            if released is not None:
                event = torch.cuda.Event() if self.device.type == "cuda" else None
                if event is not None:
                    event.record()  # after the unmap: once it completes no step reads the old pages
                self.promoter.released(event, layer, released)

    def _before_decode_step(self) -> None:
        """Host work between steps (never inside a capture): apply promotions and evictions, and
        map the page this step writes and the next one (a captured step skips this hook)."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return
        self._apply_promotions()
        self._map_pages_through(-(-(self.length + 2) // self.page_size))

    def _after_decode_step(self) -> None:
        """Hand this step's selection to the promoter (copied to pinned memory, no wait)."""
        if self._sel_log is None or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return
        if not self.promoter.sel_buffers:
            self.promoter.start(tuple(self._sel_log.shape))
        buf = self.promoter.free_buffer()
        if buf is None:
            return
        host = self.promoter.sel_buffers[buf]
        host.copy_(self._sel_log, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.promoter.submit(self.stats.decode_steps, self.length, buf, event)

    # -- layer-by-layer prefill --------------------------------------------------------------------
    layerwise_prefill = True

    @property
    def prefill_selection_shared(self) -> bool:
        """Sparse prefill selects once per chunk (see the Generator)."""
        return self.sparse_prefill

    def _carve(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A tensor from the page cache's memory (K pool, then V pool; a bump allocator reset per
        prefill), or None when it does not fit."""
        numel = math.prod(shape)
        for i, storage in enumerate((self.gpu_k, self.gpu_v)):
            if i < self._carve_at[0] or storage.dtype != dtype:
                continue
            offset = self._carve_at[1] if i == self._carve_at[0] else 0
            if offset + numel <= storage.numel():
                self._carve_at = (i, offset + numel)
                return storage.view(-1)[offset:offset + numel].view(shape)
        return None

    def begin_layerwise(self, positions: torch.Tensor) -> None:
        """Start a prefill that the caller runs layer-major: for each layer, ``attend`` on every
        chunk of ``positions`` in order; then ``end_forward``. The GPU page cache is emptied and
        its memory holds one layer's K/V for the whole context meanwhile."""
        if self.spills:
            self.promoter.wait_idle()
            self._apply_promotions()
        self._layerwise = True
        try:
            self.begin_forward(positions)
        except BaseException:
            self._layerwise = False
            raise
        self._lw_done = [0] * self.cfg.num_layers
        self.tag.fill_(-1)
        shape = (self.cfg.num_kv_heads, self.capacity, self.cfg.head_dim)
        self._carve_at = (0, 0)
        k, v = self._carve(shape, self.dtype), self._carve(shape, self.dtype)
        if k is None or v is None:  # a page cache smaller than one layer's K/V: its own buffers
            k = torch.empty(shape, device=self.device, dtype=self.dtype)
            v = torch.empty(shape, device=self.device, dtype=self.dtype)
            self._carve_at = (2, 0)
        self._lw_k, self._lw_v = k, v

    def prefill_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """Room for the prefill's hidden states in the page cache memory beyond the staging area
        (None when it does not fit: the caller allocates)."""
        return self._carve(shape, dtype)

    def _attend_layerwise(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t, start, off = q.shape[0], self.length, self._lw_done[layer]
        if off == 0 and start > 0:
            self._stage_past(layer, start)
        cos, sin = self._cos_sin
        cos, sin = cos[off:off + t], sin[off:off + t]
        q = Rotary.apply(q, cos, sin)
        pos0 = start + off
        self._lw_k[:, pos0:pos0 + t] = Rotary.apply(k, cos, sin).to(self.dtype).transpose(0, 1)
        self._lw_v[:, pos0:pos0 + t] = v.to(self.dtype).transpose(0, 1)
        if self.sparse_prefill:  # later chunks score this chunk's pages
            self._abstracts_from_staging(layer, pos0 // self.page_size, pos0 + t)
        if self.sparse_prefill and pos0 > self.budget:
            out = self._sparse_chunk_attention(layer, q.to(self.dtype), pos0)
        else:
            out = _chunk_attention(q.to(self.dtype), self._lw_k[:, :pos0 + t], self._lw_v[:, :pos0 + t], pos0,
                                   self.cfg.gqa_group, self.sm_scale)
        self._lw_done[layer] = off + t
        if off + t == self._pending:
            self._finish_layer(layer, start, start + self._pending)
        return out

    def _sparse_chunk_attention(self, layer: int, q: torch.Tensor, pos0: int) -> torch.Tensor:
        """Top-k sparse prefill (``sparse_prefill``): the chunk at pos0 attends to the sinks, the
        ``window_tokens`` before it, itself (causal) and the pages that score best for the chunk
        as a whole, within ``budget`` tokens per KV head. A page's score is the mean over the
        chunk's queries of Quest's bound, which is exact in two matmuls: with c = (max + min) / 2
        and r = (max - min) / 2 per channel, bound(q) = q.c + |q|.r."""
        t, P = q.shape[0], self.page_size
        hkv, g, d = self.cfg.num_kv_heads, self.cfg.gqa_group, self.cfg.head_dim
        w0 = max(0, pos0 - self.window_tokens) // P * P             # the local part starts on a page
        far_pages = w0 // P
        sink_pages = min(-(-self.sink_tokens // P), far_pages)
        top = max(0, (self.budget - self.window_tokens) // P - sink_pages)
        rows = q.view(t, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * t, d)
        pages = torch.arange(sink_pages, device=self.device).expand(hkv, -1)
        if top and far_pages > sink_pages:
            kmin = self.kmin[layer, :, sink_pages:far_pages].float()
            kmax = self.kmax[layer, :, sink_pages:far_pages].float()
            qg = q.float().view(t, hkv, g, d)
            q_mean, q_abs = qg.mean(0), qg.abs().mean(0)                       # (Hkv, g, D)
            scores = (q_mean @ ((kmax + kmin) / 2).transpose(1, 2)
                      + q_abs @ ((kmax - kmin) / 2).transpose(1, 2))           # (Hkv, g, pages)
            scores = scores.amax(1) if self.group_score == "max" else scores.sum(1)
            best = scores.topk(min(top, far_pages - sink_pages), dim=1).indices + sink_pages
            pages = torch.cat((pages, best), dim=1)
        tok = (pages[:, :, None] * P + torch.arange(P, device=self.device)).reshape(hkv, -1)
        heads = torch.arange(hkv, device=self.device)[:, None]
        # The chunk itself (causal), the local part before it, then the selected pages: merged by LSE.
        own_k = self._lw_k[:, pos0:pos0 + t].repeat_interleave(g, 0)
        own_v = self._lw_v[:, pos0:pos0 + t].repeat_interleave(g, 0)
        o, lse = attention_with_lse(q.transpose(0, 1).contiguous(), own_k, own_v, True, self.sm_scale)
        acc = RunningAttention(o.view(hkv, g, t, d).reshape(hkv, g * t, d), lse.view(hkv, g * t))
        if pos0 > w0:
            acc.add(*attention_with_lse(rows, self._lw_k[:, w0:pos0], self._lw_v[:, w0:pos0], False, self.sm_scale))
        if tok.shape[1]:
            acc.add(*attention_with_lse(rows, self._lw_k[heads, tok], self._lw_v[heads, tok], False, self.sm_scale))
        return acc.result(q.dtype).view(hkv, g, t, d).permute(2, 0, 1, 3).reshape(t, hkv * g, d)

    def _stage_past(self, layer: int, start: int) -> None:
        """Copy pages [0, ceil(start / P)) of a layer into the staging area: host pages in one
        zero-copy gather, NVMe-only pages through a pinned bounce buffer."""
        n = -(-start // self.page_size)
        table = self.host_slot[layer][:, :n].clamp(min=0).contiguous()
        self.tier_ops.gather_pages_to_staging(self.host_kv[layer], table, n, self._lw_k, self._lw_v)
        self.stats.prefill_bytes_h2d += self.cfg.num_kv_heads * n * self.slot_bytes
        if not self.spills:
            return
        d = self.directory
        heads = np.arange(self.cfg.num_kv_heads)[:, None] * self.max_pages
        flats = (heads + np.arange(n)[None, :]).ravel()
        on_disk = flats[d.host_map[layer, flats] < 0]
        if on_disk.size == 0:
            return
        self.writer.flush()
        rows = self.writer.rows_per_buffer
        for i in range(0, on_disk.size, rows):
            part = on_disk[i:i + rows]
            buf = self.writer.buffer()
            try:
                self.nvme.read_into_sync(d.nvme_map[layer, part].tolist(), buf[:part.size])
                pages = self._bytes_to_pages(buf[:part.size].to(self.device, non_blocking=True))
                h = torch.from_numpy(part // self.max_pages).to(self.device)
                p = torch.from_numpy(part % self.max_pages).to(self.device)
                tok = p[:, None] * self.page_size + torch.arange(self.page_size, device=self.device)
                self._lw_k[h[:, None], tok] = pages[:, 0]
                self._lw_v[h[:, None], tok] = pages[:, 1]
                if self.device.type == "cuda":
                    torch.cuda.current_stream(self.device).synchronize()  # the bounce is reused next
            finally:
                self.writer.give_back(buf)
            self.stats.prefill_nvme_read_bytes += part.size * self.slot_bytes

    def _page_elems(self) -> int:
        return 2 * self.page_size * self.cfg.head_dim

    def _bytes_to_pages(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, slot_bytes) uint8 -> (n, 2, P, D) pages (the slot's padding dropped)."""
        elem = self._lw_k.element_size()
        return rows[:, :self._page_elems() * elem].view(self.dtype).view(-1, 2, self.page_size, self.cfg.head_dim)

    def _host_plan(self, n_pages: int) -> tuple[int, int]:
        """Pages per head that stay in the host pool after a prefill: [0, sinks) and
        [recent_from, n_pages); the pages between live on NVMe."""
        keep = (self.host_slots_per_layer - self.reserve) // self.cfg.num_kv_heads
        sinks = min(-(-self.sink_tokens // self.page_size), keep)
        return sinks, max(sinks, n_pages - (keep - sinks))

    def _finish_layer(self, layer: int, start: int, end: int) -> None:
        """The layer's new tokens go to their homes; abstracts of the touched pages are updated."""
        P, hkv = self.page_size, self.cfg.num_kv_heads
        first = start // P
        self._abstracts_from_staging(layer, first, end)
        if self.spills:
            self._place_pages(layer, first, -(-end // P), end // P)
        self.tier_ops.write_through(self._lw_k[:, start:end].transpose(0, 1), self._lw_v[:, start:end].transpose(0, 1),
                                    start, self.host_kv[layer], self.host_slot[layer], self.gpu_k[layer],
                                    self.gpu_v[layer], self.cache_slot, self.tag[layer])

    def _place_pages(self, layer: int, first: int, n_pages: int, end_full: int) -> None:
        """Spill mode: decide the host set after this prefill, evict old host pages outside it,
        map new host pages, and write new NVMe pages from the staging area (background thread)."""
        d, hkv, P = self.directory, self.cfg.num_kv_heads, self.page_size
        sinks, recent_from = self._host_plan(n_pages)
        heads = np.arange(hkv)[:, None] * self.max_pages
        cuda = self.device.type == "cuda"
        # Old pages that no longer belong in the host pool (a long follow-up prompt).
        old = (heads + np.arange(sinks, min(first, recent_from))[None, :]).ravel()
        old = old[d.host_map[layer, old] >= 0] if old.size else old
        if old.size:
            if cuda:
                torch.cuda.current_stream(self.device).synchronize()  # their host copies are complete
            rows = self.promoter.host_rows[layer]
            dirty = old[d.nvme_map[layer, old] < 0]
            if dirty.size:
                self.nvme.write(d.assign_nvme(layer, dirty).tolist(), [rows[s] for s in d.host_map[layer, dirty].tolist()])
            slots = d.release_host(layer, old)
            self._set_host_slots(layer, old, np.full(old.size, -1, dtype=np.int32))
            d.recycle(layer, slots)  # later GPU writes into them are stream-ordered after the gather
        new = np.arange(first, n_pages)
        to_host = new[(new < sinks) | (new >= recent_from)]
        to_disk = new[(new >= sinks) & (new < recent_from)]
        host_flats = (heads + to_host[None, :]).ravel()
        host_flats = host_flats[d.host_map[layer, host_flats] < 0]
        d.nvme_map[layer, (heads + new[None, :]).ravel()] = -1  # disk copies of rewritten pages are stale
        if host_flats.size:
            self._set_host_slots(layer, host_flats, d.assign_host(layer, host_flats))
        # Full host pages are written to NVMe too (in the background), so the promoter can later
        # evict them without a write; partial pages still change and are written when evicted.
        full_host = to_host[to_host < end_full]
        room = d.nvme_slots - d.nvme_pages - hkv * to_disk.size  # a small page file: write on eviction
        if full_host.size and hkv * full_host.size <= room:
            flats = (heads + full_host[None, :]).ravel()
            self._spill_from_staging(flats, d.assign_nvme(layer, flats))
        if to_disk.size:
            disk_flats = (heads + to_disk[None, :]).ravel()
            was_host = disk_flats[d.host_map[layer, disk_flats] >= 0]
            nvme_slots = d.assign_nvme(layer, disk_flats)
            self._spill_from_staging(disk_flats, nvme_slots)
            if was_host.size:  # a continuing page that now belongs on disk
                slots = d.release_host(layer, was_host)
                self._set_host_slots(layer, was_host, np.full(was_host.size, -1, dtype=np.int32))
                d.recycle(layer, slots)
        self._mapped_through = max(self._mapped_through, n_pages)

    def _spill_from_staging(self, flats: np.ndarray, nvme_slots: np.ndarray) -> None:
        P, used = self.page_size, self._page_elems() * self._lw_k.element_size()
        rows = self.writer.rows_per_buffer
        for i in range(0, flats.size, rows):
            part = flats[i:i + rows]
            h = torch.from_numpy(part // self.max_pages).to(self.device)
            tok = torch.from_numpy(part % self.max_pages).to(self.device)[:, None] * P + torch.arange(P, device=self.device)
            pages = torch.stack((self._lw_k[h[:, None], tok], self._lw_v[h[:, None], tok]), dim=1)
            buf = self.writer.buffer()
            buf[:part.size, :used].copy_(pages.reshape(part.size, -1).view(torch.uint8), non_blocking=True)
            event = None
            if self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
            self.writer.submit(nvme_slots[i:i + rows], buf, event)
            self.stats.prefill_nvme_pages_written += part.size

    # -- chunk-major prefill (host-only stores) ----------------------------------------------------
    def _stream_buffers(self) -> list:
        if self._staging is None:
            hkv, d, n = self.cfg.num_kv_heads, self.cfg.head_dim, 2 if self.side is not None else 1
            self._staging = [(torch.empty((hkv, self.prefill_block, d), device=self.device, dtype=self.dtype),
                              torch.empty((hkv, self.prefill_block, d), device=self.device, dtype=self.dtype))
                             for _ in range(n)]
        return self._staging

    def _stage_block(self, layer: int, first_page: int, n_pages: int, buf: int) -> None:
        k_st, v_st = self._stream_buffers()[buf]
        slots = self.host_slot[layer][:, first_page:first_page + n_pages].contiguous()
        self.tier_ops.gather_pages_to_staging(self.host_kv[layer], slots, n_pages, k_st, v_st)
        self.stats.prefill_bytes_h2d += 2 * k_st.shape[0] * n_pages * self.page_size * k_st.shape[2] * k_st.element_size()

    def _prefill_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t, start = q.shape[0], self.length
        hkv, g, d, P = self.cfg.num_kv_heads, self.cfg.gqa_group, self.cfg.head_dim, self.page_size
        rows = q.view(t, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * t, d)
        # Self-attention of the chunk (causal), heads expanded: the chunk is small.
        o, lse = attention_with_lse(q.transpose(0, 1).contiguous(),
                                    k.transpose(0, 1).repeat_interleave(g, 0).contiguous(),
                                    v.transpose(0, 1).repeat_interleave(g, 0).contiguous(), True, self.sm_scale)
        acc = RunningAttention(o.view(hkv, g, t, d).reshape(hkv, g * t, d), lse.view(hkv, g * t))
        # The past (exactly `start` tokens: a partial page's newer slots belong to this chunk),
        # in blocks streamed from the host pool.
        block_pages = self.prefill_block // P
        past_pages = -(-start // P)
        blocks = [(p0, min(block_pages, past_pages - p0)) for p0 in range(0, past_pages, block_pages)]
        cuda = self.side is not None
        staging = self._stream_buffers() if blocks else []
        if cuda and blocks:
            main = torch.cuda.current_stream(self.device)
            self.side.wait_stream(main)  # the chunk's host writes land before blocks are read
            self._side_forked = True
            with torch.cuda.stream(self.side):
                self._stage_block(layer, *blocks[0], 0)
                self._staged[0].record(self.side)
        for i, (p0, n) in enumerate(blocks):
            buf = i % 2 if cuda else 0
            if cuda:
                if i + 1 < len(blocks):  # fetch the next block while this one is attended
                    with torch.cuda.stream(self.side):
                        self.side.wait_event(self._consumed[(i + 1) % 2])
                        self._stage_block(layer, *blocks[i + 1], (i + 1) % 2)
                        self._staged[(i + 1) % 2].record(self.side)
                main.wait_event(self._staged[buf])
            else:
                self._stage_block(layer, p0, n, buf)
            k_st, v_st = staging[buf]
            tokens = min(n * P, start - p0 * P)
            acc.add(*attention_with_lse(rows, k_st[:, :tokens], v_st[:, :tokens], False, self.sm_scale))
            if cuda:
                self._consumed[buf].record(main)
        return acc.result(q.dtype).view(hkv, g, t, d).permute(2, 0, 1, 3).reshape(t, hkv * g, d)

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
        if decode and self.spills:
            self._after_decode_step()

    def begin_replay(self, n: int) -> None:
        if self.spills:
            self._before_decode_step()
        super().begin_replay(n)
        self.stats.decode_steps += 1

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def memory_bytes(self) -> int:
        gpu = (self.gpu_k, self.gpu_v, self.tag, self.cache_slot, self.kmin, self.kmax, self.host_slot, self.logical)
        staging = sum(t.numel() * t.element_size() for pair in (self._staging or []) for t in pair)
        return sum(t.numel() * t.element_size() for t in gpu) + staging

    def host_bytes(self) -> int:
        return self.host_pool.nbytes

    def report(self) -> dict:
        """Hit rate and bytes moved (one sync: call after a run, not inside it)."""
        selected = int(self.stats.selected)
        hits = int(self.stats.hits)
        page_bytes = 2 * self.page_size * self.cfg.head_dim * torch.tensor([], dtype=self.dtype).element_size()
        steps = max(1, self.stats.decode_steps)
        out = {"decode_steps": self.stats.decode_steps, "selected_pages": selected, "cache_hits": hits,
               "hit_rate": hits / selected if selected else None,
               "h2d_bytes_per_token_attention": (selected - hits) * page_bytes / steps,
               "prefetched_pages": int(self.stats.prefetched), "prefetch_hits": int(self.stats.prefetch_hits),
               "prefetch_accuracy": (int(self.stats.prefetch_hits) / int(self.stats.prefetched)
                                     if int(self.stats.prefetched) else None),
               "prefetch": self.prefetch_mode, "prefetch_decision": self.prefetch_decision,
               "h2d_bytes_per_token_prefetch": int(self.stats.prefetched) * page_bytes / steps,
               "prefill_h2d_bytes": self.stats.prefill_bytes_h2d,
               "gpu_cache_slots_per_layer": self.cache_slots, "host_pool_bytes": self.host_pool.nbytes,
               "host_slots_per_layer": self.host_slots_per_layer, "pinned": self.host_pool.pinned}
        if self.spills:
            self.promoter.wait_idle()
            self.writer.flush()
            ps = self.promoter.stats
            unreadable = int(self.stats.unreadable)
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
                "promoter_busy_s": ps.busy_s})
        return out

    def step_counters(self) -> dict:
        """Cumulative counters for lcrun profile (synchronises: call between steps)."""
        selected, hits = int(self.stats.selected), int(self.stats.hits)
        unreadable = int(self.stats.unreadable)
        out = {"selected_pages": selected, "gpu_hits": hits, "host_reads": selected - hits - unreadable,
               "prefetched_pages": int(self.stats.prefetched), "prefetch_hits": int(self.stats.prefetch_hits),
               "nvme_reads": unreadable, "h2d_bytes": (selected - hits - unreadable) * self.slot_bytes,
               "pages_gpu": int((self.tag >= 0).sum())}
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
