"""The tiered KV store behind the attention seam: GPU page cache over a pinned host pool.

Every page (P tokens of one KV head of one layer, K and V) has its home in the pinned host pool,
written through as tokens arrive; the GPU holds a direct-mapped cache of pages per layer, so an
eviction never writes back. Page abstracts (key min/max) stay on the GPU for every page.

Decode, per layer (no host synchronisation; per-step metadata built once in ``_plan``):
  score all full pages -> select sinks + window + top pages -> attend, reading each selected page
  from the GPU cache when it is there and straight from pinned host memory (zero-copy) when not
  -> admit the missed pages into the cache on the side stream, so the next step finds them.
The prefetcher runs on a side CUDA stream: while layer l computes, it scores layer l+1's pages
with layer l's query (a speculative selection, as InfiniGen) and admits the predicted pages that
are missing; layer l+1's attention waits for that admission only, never for a host.

Prefill, per layer: the chunk's K/V go to their host homes; the chunk attends exactly to the past,
streamed from the host in blocks (double-buffered: the side stream fetches block i+1 while block
i is attended), merged with the chunk's causal self-attention by log-sum-exp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lcrun.errors import ConfigError
from lcrun.kernels import kernel_backend, plan_selection
from lcrun.kernels.attention_lse import RunningAttention, attention_with_lse
from lcrun.offload.host_pool import HostPagePool
from lcrun.runtime.kv_cache import AttentionCache
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.rope import Rotary


def _tiered_ops(device: torch.device):
    """Triton kernels on CUDA (zero-copy host reads); their torch references elsewhere."""
    if device.type == "cuda":
        from lcrun.kernels import tiered as ops
    else:
        from lcrun.kernels import tiered_reference as ops
    return ops


@dataclass
class TierStats:
    """Device-side counters (read once, at report time: no sync in the loop)."""
    selected: torch.Tensor
    hits: torch.Tensor
    decode_steps: int = 0
    prefill_bytes_h2d: int = 0


class TieredTopKCache(AttentionCache):
    def __init__(self, cfg: ModelConfig, capacity: int, device, dtype, *, cache_slots_per_layer: int,
                 page_size: int = 32, budget: int = 2048, sink_tokens: int = 64, window_tokens: int = 512,
                 group_score: str = "max", prefill_block: int = 8192, prefetch: bool = True,
                 backend: str = "auto"):
        super().__init__(cfg, capacity, device, dtype)
        if cache_slots_per_layer < 1:
            raise ConfigError("the GPU page cache needs at least one slot per layer")
        L, hkv, d, P = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, page_size
        self.page_size, self.budget = P, budget
        self.sink_tokens, self.window_tokens, self.group_score = sink_tokens, window_tokens, group_score
        self.prefill_block = max(P, prefill_block // P * P)
        self.prefetch = prefetch and self.device.type == "cuda"
        self.ops = kernel_backend(self.device, backend)
        self.tier_ops = _tiered_ops(self.device)
        self.sm_scale = 1.0 / math.sqrt(d)
        self.max_pages = -(-capacity // P)
        flat_pages = hkv * self.max_pages

        # Host homes: one pinned allocation, a slot per page (layer-major), K and V side by side.
        elem = torch.tensor([], dtype=dtype).element_size()
        slot_bytes = -(-2 * P * d * elem // 4096) * 4096
        self.host_pool = HostPagePool(L * flat_pages, slot_bytes)
        self.host_kv = self.host_pool.slots_view(dtype, (2, P, d)).view(L, flat_pages, 2, P, d)
        self.host_slot = torch.arange(flat_pages, device=self.device, dtype=torch.int32).view(hkv, self.max_pages)

        # GPU: abstracts of every page, and the direct-mapped page cache.
        S = cache_slots_per_layer
        self.cache_slots = S
        self.gpu_k = torch.zeros((L, S, P, d), device=self.device, dtype=dtype)
        self.gpu_v = torch.zeros_like(self.gpu_k)
        self.tag = torch.full((L, S), -1, device=self.device, dtype=torch.int32)
        # Consecutive pages of a head take consecutive slots, heads offset from each other, so the
        # recent window and the sinks of all heads never collide while the cache holds a step.
        self.cache_slot = (torch.arange(flat_pages, device=self.device, dtype=torch.int64) % S).to(
            torch.int32).view(hkv, self.max_pages)
        self.kmin = torch.zeros((L, hkv, self.max_pages, d), device=self.device, dtype=dtype)
        self.kmax = torch.zeros_like(self.kmin)
        self._head_base = (torch.arange(hkv, device=self.device, dtype=torch.int32) * self.max_pages)[:, None]
        # Selection maps pages through a table: the identity gives logical page ids.
        self.logical = torch.arange(self.max_pages, device=self.device, dtype=torch.int32)[None].expand(
            hkv, -1).contiguous()

        scalar = dict(device=self.device, dtype=torch.int32)
        self._start = torch.zeros(1, **scalar)
        self._seq_len = torch.zeros(1, **scalar)
        self._num_full = torch.zeros(1, **scalar)
        self.stats = TierStats(selected=torch.zeros((), device=self.device, dtype=torch.int64),
                               hits=torch.zeros((), device=self.device, dtype=torch.int64))
        if self.device.type == "cuda":
            self.side = torch.cuda.Stream(self.device)
            self._prefetched = [torch.cuda.Event() for _ in range(L)]
            self._staging = [(torch.empty((hkv, self.prefill_block, d), device=self.device, dtype=dtype),
                              torch.empty((hkv, self.prefill_block, d), device=self.device, dtype=dtype))
                             for _ in range(2)]
            self._staged = [torch.cuda.Event() for _ in range(2)]
            self._consumed = [torch.cuda.Event() for _ in range(2)]
        else:
            self.side = None
            self._staging = [(torch.empty((hkv, self.prefill_block, d), dtype=dtype),
                              torch.empty((hkv, self.prefill_block, d), dtype=dtype))]

    # -- per forward -----------------------------------------------------------------------------
    def _plan(self, positions: torch.Tensor) -> None:
        t, start = positions.numel(), self.length
        self._cos_sin = self.rotary.cos_sin(positions, self.dtype)
        self._pos = positions
        self._cross_stream_refs: list[torch.Tensor] = []
        if t == 1:
            self._start.copy_(positions[:1])  # from the device: the step can be graph-captured
            torch.add(self._start, 1, out=self._seq_len)
            torch.floor_divide(self._seq_len, self.page_size, out=self._num_full)
            self._selection = plan_selection(self._seq_len, self.max_pages, self.page_size, self.sink_tokens,
                                             self.window_tokens, self.budget, self.ops.selection_bounds)
            self._prefetched_into = [False] * self.cfg.num_layers
            self.stats.decode_steps += 1  # host count; replays add theirs in begin_replay

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cos, sin = self._cos_sin
        q = Rotary.apply(q, cos, sin)
        k = Rotary.apply(k, cos, sin).to(self.dtype)
        v = v.to(self.dtype)
        t = q.shape[0]
        start = self.length if t > 1 else self._start
        if t == 1 and self.prefetch and self._prefetched_into[layer]:
            # This step's predicted admissions into this layer must land before the new token is
            # written through, or a page being admitted could miss the token (its host copy read
            # first, its tag set after the write checked it). Earlier steps' side work was joined
            # at the end of their forward.
            torch.cuda.current_stream(self.device).wait_event(self._prefetched[layer])
        self.tier_ops.write_through(k, v, start, self.host_kv[layer], self.host_slot, self.gpu_k[layer],
                                    self.gpu_v[layer], self.cache_slot, self.tag[layer])
        self._update_abstracts(layer, k)
        if t > 1:
            return self._prefill_attention(layer, q, k, v)
        return self._decode_attention(layer, q[0].contiguous())[None]

    # -- abstracts ---------------------------------------------------------------------------------
    def _update_abstracts(self, layer: int, k: torch.Tensor) -> None:
        """Running per-page key min/max of the pages these tokens land in (a page restarts its
        running values at its first token), so a page's abstract is right the step it fills."""
        P, t = self.page_size, k.shape[0]
        kmin, kmax = self.kmin[layer], self.kmax[layer]
        pos = self._pos
        if t == 1:  # decode: one page, few kernels (this runs for every layer of every step)
            page = pos // P
            fresh = (pos % P == 0)[:, None, None]
            kt = k.transpose(0, 1)  # (Hkv, 1, D)
            kmin.index_copy_(1, page, torch.where(fresh, kt, torch.minimum(kmin.index_select(1, page), kt)))
            kmax.index_copy_(1, page, torch.where(fresh, kt, torch.maximum(kmax.index_select(1, page), kt)))
            return
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

    # -- decode ------------------------------------------------------------------------------------
    def _select(self, layer: int, q1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self._selection
        scores = self.ops.score_pages(q1, self.kmin[layer], self.kmax[layer], self._num_full, self.group_score,
                                      candidates=plan.bounds)
        # The identity table makes the selected "slots" logical page ids.
        return self.ops.select_top_pages(scores, self.logical, plan, masked=True)

    def _admit(self, layer: int, pages: torch.Tensor, lens: torch.Tensor) -> None:
        self.tier_ops.admit_pages(pages, lens, self.cache_slot, self.tag[layer], self.host_slot,
                                  self.host_kv[layer], self.gpu_k[layer], self.gpu_v[layer])

    def _count_hits(self, layer: int, pages: torch.Tensor, lens: torch.Tensor) -> None:
        flat = pages + self._head_base                     # flat page ids h * max_pages + p
        cached = self.tag[layer][self.cache_slot.view(-1)[flat].long()] == flat
        valid = lens > 0
        self.stats.selected += valid.sum()
        self.stats.hits += (cached & valid).sum()

    def _decode_attention(self, layer: int, q1: torch.Tensor) -> torch.Tensor:
        pages, lens = self._select(layer, q1)
        main = torch.cuda.current_stream(self.device) if self.side is not None else None
        self._count_hits(layer, pages, lens)
        out = self.tier_ops.tiered_decode_attention(
            q1, self.gpu_k[layer], self.gpu_v[layer], self.host_kv[layer], pages, lens, self.cache_slot,
            self.tag[layer], self.host_slot, self.sm_scale)
        if self.side is None:
            self._admit(layer, pages, lens)
            return out
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            # Demand admission: pages this step read from the host become cached for the next.
            self._admit(layer, pages, lens)
            nxt = layer + 1
            if self.prefetch and nxt < self.cfg.num_layers:
                # Speculative: layer l's query scores layer l+1's pages; admit what is missing.
                spec_pages, spec_lens = self._select(nxt, q1)
                self._admit(nxt, spec_pages, spec_lens)
                self._prefetched_into[nxt] = True
                self._cross_stream_refs += (spec_pages, spec_lens)  # as validated on the H100
                self._prefetched[nxt].record(self.side)
        # Tensors made on the main stream and read on the side stream stay referenced until the
        # streams join at the end of the step: freed earlier, the allocator could hand their
        # memory to a later main-stream tensor while the side stream still reads it (inside a
        # CUDA-graph capture record_stream does not protect them).
        self._cross_stream_refs += (pages, lens, q1)
        return out

    # -- prefill -----------------------------------------------------------------------------------
    def _stage_block(self, layer: int, first_page: int, n_pages: int, buf: int) -> None:
        k_st, v_st = self._staging[buf]
        slots = self.host_slot[:, first_page:first_page + n_pages].contiguous()
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
        if cuda and blocks:
            main = torch.cuda.current_stream(self.device)
            self.side.wait_stream(main)  # the chunk's host writes land before blocks are read
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
            k_st, v_st = self._staging[buf]
            tokens = min(n * P, start - p0 * P)
            acc.add(*attention_with_lse(rows, k_st[:, :tokens], v_st[:, :tokens], False, self.sm_scale))
            if cuda:
                self._consumed[buf].record(main)
        return acc.result(q.dtype).view(hkv, g, t, d).permute(2, 0, 1, 3).reshape(t, hkv * g, d)

    # -- bookkeeping -------------------------------------------------------------------------------
    graph_safe_decode = True  # every per-step quantity of a decode step lives on the device

    def end_forward(self) -> None:
        if self.side is not None:  # join the side stream: a step's work ends with the step
            torch.cuda.current_stream(self.device).wait_stream(self.side)
        self._cross_stream_refs = []
        super().end_forward()

    def begin_replay(self, n: int) -> None:
        super().begin_replay(n)
        self.stats.decode_steps += 1

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def memory_bytes(self) -> int:
        gpu = (self.gpu_k, self.gpu_v, self.tag, self.cache_slot, self.kmin, self.kmax, self.host_slot, self.logical)
        staging = sum(t.numel() * t.element_size() for pair in self._staging for t in pair) if self.side else 0
        return sum(t.numel() * t.element_size() for t in gpu) + staging

    def host_bytes(self) -> int:
        return self.host_pool.nbytes

    def report(self) -> dict:
        """Hit rate and bytes moved (one sync: call after a run, not inside it)."""
        selected = int(self.stats.selected)
        hits = int(self.stats.hits)
        page_bytes = 2 * self.page_size * self.cfg.head_dim * torch.tensor([], dtype=self.dtype).element_size()
        steps = max(1, self.stats.decode_steps)
        return {"decode_steps": self.stats.decode_steps, "selected_pages": selected, "cache_hits": hits,
                "hit_rate": hits / selected if selected else None,
                "h2d_bytes_per_token_attention": (selected - hits) * page_bytes / steps,
                "prefill_h2d_bytes": self.stats.prefill_bytes_h2d,
                "gpu_cache_slots_per_layer": self.cache_slots, "host_pool_bytes": self.host_pool.nbytes,
                "pinned": self.host_pool.pinned}

    def close(self) -> None:
        self.host_pool.close()
