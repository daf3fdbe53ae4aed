"""Paged KV cache with Quest-style top-k page attention in decode, exact attention in prefill.

Per layer: K/V pools of pages (one slot = one page of one KV head), a page table, and per-page
key min/max abstracts. Prefill chunks attend exactly over all cached tokens. A decode step scores
every full page from its abstract, keeps sink + window + top pages within ``budget`` tokens per KV
head, and attends to those only; with ``length <= budget`` that is every page, i.e. dense.

The decode path keeps changing lengths in device tensors and never reads them back, so a later
issue can capture the whole step in a CUDA graph.
"""
from __future__ import annotations

import math

import torch

from lcrun.errors import ConfigError
from lcrun.kernels import kernel_backend, plan_selection, write_kv
from lcrun.ranges import named_range
from lcrun.kernels.key_rotation import KeyRotation, update_relative_abstracts
from lcrun.runtime.kv_cache import AttentionCache
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.positions import PositionRule, decode_layout, window_prefill_attention
from lcrun.runtime.rope import Rotary


def resolve_chunk_pages(chunk_pages: int | str, max_pages: int, top_chunks: int) -> int:
    """Pages per chunk of hierarchical selection (0: flat): "auto" picks by the pages per KV head
    (lcrun.kernels.chunk_abstracts.auto_chunk_pages); both counts must be powers of two."""
    if chunk_pages == "auto":
        from lcrun.kernels.chunk_abstracts import auto_chunk_pages
        chunk_pages = auto_chunk_pages(max_pages)
    if chunk_pages < 0 or chunk_pages & (chunk_pages - 1) or top_chunks < 1 or top_chunks & (top_chunks - 1):
        raise ConfigError(f"chunk_pages ({chunk_pages}) and top_chunks ({top_chunks}) must be powers of two")
    return chunk_pages


def export_abstracts(owner, layer: int, n_pages: int) -> dict[str, torch.Tensor]:
    """A saved context's page abstracts of ``layer``'s first ``n_pages`` pages: ``owner`` keeps
    kmin/kmax and, when its positions may move, rel_min/rel_max ((L, Hkv, max_pages, D); the paged
    cache and the tiered store's PageSelector). Chunk abstracts are rebuilt from these on load."""
    names = ("kmin", "kmax") + (("rel_min", "rel_max") if owner.positions.may_move else ())
    return {name: getattr(owner, name)[layer, :, :n_pages] for name in names}


def import_abstracts(owner, layer: int, tensors: dict[str, torch.Tensor]) -> None:
    """export_abstracts' tensors back into ``owner``."""
    for name in ("kmin", "kmax") + (("rel_min", "rel_max") if owner.positions.may_move else ()):
        value = tensors[name]
        getattr(owner, name)[layer, :, :value.shape[1]] = value


def snapshot_positions(positions: PositionRule) -> int | None:
    """The position rule in a saved context's layout: where queries start moving (None: never)."""
    return positions.trained_window


class PagedTopKCache(AttentionCache):
    def __init__(self, cfg: ModelConfig, capacity: int, device, dtype, page_size: int = 32,
                 budget: int = 2048, sink_tokens: int = 64, window_tokens: int = 512,
                 group_score: str = "max", dense_layers: int = 0, backend: str = "auto",
                 chunk_pages: int | str = 0, top_chunks: int = 32, positions: PositionRule = PositionRule(None)):
        """dense_layers: the first N layers attend to every page in decode too (Quest leaves the
        first layers dense). backend: auto | triton | torch (see lcrun.kernels.backend).
        chunk_pages: 0 = flat selection (every page abstract scored each step); a power of two =
        hierarchical selection (lcrun.kernels.chunk_abstracts): chunk abstracts of that many pages
        are kept too, scored first, and only the pages of the best ``top_chunks`` chunks compete;
        "auto" = hierarchical (32-page chunks) from AUTO_MIN_PAGES pages per KV head (chunk_abstracts.auto_chunk_pages).
        positions: when queries move to window positions (lcrun.runtime.positions). A rule that may
        move them keeps page-relative abstracts too; hierarchical selection then runs on those
        (window positions), and true positions (inside the trained window) select flat."""
        chunk_pages = resolve_chunk_pages(chunk_pages, -(-capacity // page_size), top_chunks)
        super().__init__(cfg, capacity, device, dtype)
        if page_size < 1 or page_size & (page_size - 1):
            raise ConfigError(f"page size must be a power of two, got {page_size}")
        if budget < page_size:
            raise ConfigError(f"budget {budget} is smaller than one page of {page_size} tokens")
        if group_score not in ("max", "sum"):
            raise ConfigError(f"group_score must be max or sum, got {group_score!r}")
        self.page_size = page_size
        self.chunk_pages = chunk_pages
        self.top_chunks = top_chunks
        self.budget = budget
        self.sink_tokens = sink_tokens
        self.window_tokens = window_tokens
        self.group_score = group_score
        self.dense_layers = dense_layers
        self.ops = kernel_backend(self.device, backend)
        self.sm_scale = 1.0 / math.sqrt(cfg.head_dim)

        layers, hkv, d = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        self.max_pages = -(-capacity // page_size)
        num_slots = hkv * self.max_pages
        pool_shape = (layers, num_slots, page_size, d)
        self.k_pool = torch.zeros(pool_shape, device=self.device, dtype=dtype)
        self.v_pool = torch.zeros(pool_shape, device=self.device, dtype=dtype)
        self.kmin = torch.zeros((layers, hkv, self.max_pages, d), device=self.device, dtype=dtype)
        self.kmax = torch.zeros_like(self.kmin)
        self.positions = positions
        self._window_step = False  # this forward's decode query sits at window positions
        self._prefill_end = 0       # where the prompt being prefilled ends (begin_prefill)
        if positions.may_move:  # page-relative abstracts (positions module doc) and the step's layout
            self.rel_min, self.rel_max = torch.zeros_like(self.kmin), torch.zeros_like(self.kmin)
            self._layout = torch.zeros(3, device=self.device, dtype=torch.int32)
        if chunk_pages:
            from lcrun.kernels.chunk_abstracts import chunk_abstracts_like
            self.cmin, self.cmax = chunk_abstracts_like(self.kmin, chunk_pages)
        # Identity mapping for now (all pages resident); a tiered store will rewrite entries.
        identity = torch.arange(num_slots, device=self.device, dtype=torch.int32).reshape(hkv, self.max_pages)
        self.page_table = identity[None].repeat(layers, 1, 1).contiguous()

        # Decode-step scalars live on the device and are updated in place (no host sync).
        scalar = dict(device=self.device, dtype=torch.int32)
        self._start = torch.zeros(1, **scalar)       # position of the decode token
        self._seq_len = torch.zeros(1, **scalar)     # tokens cached once it is written
        self._num_full = torch.zeros(1, **scalar)
        self._last_page = torch.zeros(1, **scalar)   # page the decode token lands in
        self._num_pages = torch.zeros(1, **scalar)

    # -- per forward ---------------------------------------------------------------------------
    def _plan(self, positions: torch.Tensor) -> None:
        t, start = positions.numel(), self.length
        self._cos_sin = self.rotary.cos_sin(positions, self.dtype)
        P = self.page_size
        if t == 1:
            self._start.copy_(positions[:1])  # from the device, so a captured step replays right
            torch.add(self._start, 1, out=self._seq_len)
            torch.floor_divide(self._seq_len, P, out=self._num_full)
            torch.floor_divide(self._start, P, out=self._last_page)
            torch.add(self._last_page, 1, out=self._num_pages)
            self._selection = plan_selection(self._seq_len, self.max_pages, P, self.sink_tokens,
                                             self.window_tokens, self.budget, self.ops.selection_bounds)
            self._window_step = self.positions.window_at(start)
            if self._window_step:
                # Key written at its true position; the query at c - shift, scored at its distance
                # to the far pages (lcrun.runtime.positions).
                decode_layout(self._selection.bounds, P, self._layout)
                q_pos = positions - self._layout[2]
                self._key_cos_sin = self._cos_sin
                self._cos_sin = self.rotary.cos_sin(q_pos, self.dtype)
                self._score_cos_sin = self.rotary.cos_sin(q_pos - self._layout[0], self.dtype)
            if self.dense_layers:
                pages = torch.arange(self.max_pages, device=self.device, dtype=torch.int32)
                self._dense_lens = torch.clamp(self._seq_len - pages * P, 0, P)[None].expand(
                    self.cfg.num_kv_heads, -1).contiguous()
        else:
            # Pages that this chunk completes; a partly filled page is refreshed by later writes.
            first, end = start // P, (start + t) // P
            self._filled_pages = torch.arange(first, end, device=self.device, dtype=torch.int32)
            self._full_after_chunk = torch.tensor([end], device=self.device, dtype=torch.int32)

    def _hierarchical(self, window_step: bool) -> bool:
        """Chunk abstracts follow the page-relative abstracts when positions may move."""
        return bool(self.chunk_pages) and (window_step or not self.positions.may_move)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[0] > 1:
            return self._prefill(layer, q, k, v)
        if self._window_step:
            k_pre = k
            q, k, q_sel = Rotary.apply_window(q, k, self._cos_sin, self._key_cos_sin, self._score_cos_sin)
            q_sel = q_sel[0]
        else:
            k_pre = k
            q, k = Rotary.apply_qk(q, k, *self._cos_sin)
            q_sel = None
        k = k.to(self.dtype)
        v = v.to(self.dtype)
        k_pool, v_pool, table = self.k_pool[layer], self.v_pool[layer], self.page_table[layer]
        with named_range("kv_write"):
            write_kv(k_pool, v_pool, table, k, v, self._start)
            self._update_decode_abstracts(layer, k_pool, table, k_pre)
        q1 = q[0].contiguous()
        if layer < self.dense_layers and not self._window_step:
            with named_range("attend"):
                out = self.ops.sparse_decode_attention(q1, k_pool, v_pool, table, self._dense_lens,
                                                       self.sm_scale, num_entries=self._num_pages)
            return out[None]
        slots, lens = self._select(layer, q_sel if self._window_step else q1, table)
        rotation = None
        if self._window_step:
            rotation = KeyRotation(self.rotary.inv_freq, slots, self.max_pages, self._layout)
        with named_range("attend"):
            out = self.ops.sparse_decode_attention(q1, k_pool, v_pool, slots, lens, self.sm_scale, rotation=rotation)
        return out[None]

    def _update_decode_abstracts(self, layer: int, k_pool: torch.Tensor, table: torch.Tensor,
                                 k_pre: torch.Tensor) -> None:
        """The abstracts of the page being filled, every step (cheap: one page per KV head), so
        they are right the step the page becomes full, with no host-side branch."""
        if not self._window_step:  # true-position abstracts are read inside the trained window only
            self.ops.update_abstracts(k_pool, table, self.kmin[layer], self.kmax[layer], self._last_page,
                                      self._seq_len)
        if self.positions.may_move:
            self.ops.update_relative_abstract(k_pre[0].to(self.dtype), self.rotary.inv_freq, self.rel_min[layer],
                                     self.rel_max[layer], self._start, self.page_size)
        if self.chunk_pages:  # the chunk of that page: it counts the page once it is full
            lo, hi = self._selection_abstracts(layer, self.positions.may_move)
            self.ops.update_chunk_abstracts(lo, hi, self.cmin[layer], self.cmax[layer], self._last_page,
                                            self._num_full, self.chunk_pages)

    def _selection_abstracts(self, layer: int, relative: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.rel_min[layer], self.rel_max[layer]) if relative else (self.kmin[layer], self.kmax[layer])

    def _select(self, layer: int, q1: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sinks, window and top pages: q1 is the scoring query (post-RoPE, or at its distance to
        the far pages in a window step)."""
        plan = self._selection
        kmin, kmax = self._selection_abstracts(layer, self._window_step)
        if self._hierarchical(self._window_step):
            with named_range("topk"):
                return self.ops.select_top_pages_hier(q1, kmin, kmax, self.cmin[layer], self.cmax[layer],
                                                      self._num_full, table, plan, self.chunk_pages,
                                                      self.top_chunks, self.group_score)
        with named_range("score"):
            scores = self.ops.score_pages(q1, kmin, kmax, self._num_full, self.group_score, candidates=plan.bounds)
        with named_range("topk"):
            return self.ops.select_top_pages(scores, table, plan, masked=True)

    def _prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Exact attention for queries inside the trained window, window positions past it."""
        start, t = self.length, q.shape[0]
        cos, sin = self._cos_sin
        q_pre = q
        q, k_rot = Rotary.apply_qk(q, k, cos, sin)
        k_pool, v_pool, table = self.k_pool[layer], self.v_pool[layer], self.page_table[layer]
        write_kv(k_pool, v_pool, table, k_rot.to(self.dtype), v.to(self.dtype), start)
        self.ops.update_abstracts(k_pool, table, self.kmin[layer], self.kmax[layer], self._filled_pages)
        if self.positions.may_move:  # before attending: later pieces of this chunk select among its pages
            update_relative_abstracts(k.to(self.dtype), self._positions, self.rotary.inv_freq, self.rel_min[layer],
                                      self.rel_max[layer], self.page_size)
        if self.chunk_pages:
            lo, hi = self._selection_abstracts(layer, self.positions.may_move)
            self.ops.update_chunk_abstracts(lo, hi, self.cmin[layer], self.cmax[layer], self._filled_pages,
                                            self._full_after_chunk, self.chunk_pages)
        n_true = self.positions.true_queries(start, t, self._prefill_end)
        outs = []
        if n_true:
            outs.append(self.ops.paged_prefill_attention(q[:n_true].contiguous(), k_pool, v_pool, table, start,
                                                         self.sm_scale))
        if n_true < t:
            hkv, d = self.cfg.num_kv_heads, self.cfg.head_dim
            outs.append(window_prefill_attention(
                q_pre[n_true:], k_pool.view(hkv, -1, d), v_pool.view(hkv, -1, d), self.rel_min[layer],
                self.rel_max[layer], start + n_true, self.rotary, page_size=self.page_size,
                sink_tokens=self.sink_tokens, window_tokens=self.window_tokens, budget=self.budget,
                group_score=self.group_score, sm_scale=self.sm_scale))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def moves_queries(self, end: int) -> bool:
        return self.positions.passes(end)

    def begin_prefill(self, end: int) -> None:
        self._prefill_end = end

    def shares_prefill_selection(self, end: int) -> bool:
        return self.positions.window_at(end - 1)

    def decode_graph_key(self) -> object:
        return "window" if self.positions.window_at(self.length) else "true"

    # -- bookkeeping ---------------------------------------------------------------------------
    graph_safe_decode = True  # a decode step reads its position and lengths from device tensors

    def truncate(self, length: int) -> None:
        # Abstracts of pages that are no longer full are ignored (num_full shrinks) and rebuilt
        # when the page fills again.
        self.length = min(self.length, length)

    # -- saved contexts ------------------------------------------------------------------------
    def snapshot_layout(self) -> dict:
        return {"cache": "paged", "dtype": str(self.dtype), "page_size": self.page_size,
                "positions": snapshot_positions(self.positions)}

    def export_layer(self, layer: int) -> dict[str, torch.Tensor]:
        n = -(-self.length // self.page_size)
        slots = self.page_table[layer][:, :n].long()  # (Hkv, n)
        return {"k": self.k_pool[layer][slots], "v": self.v_pool[layer][slots],  # (Hkv, n, P, D)
                **export_abstracts(self, layer, n)}

    def import_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        n = tensors["k"].shape[1]
        slots = self.page_table[layer][:, :n].long()
        self.k_pool[layer][slots] = tensors["k"]
        self.v_pool[layer][slots] = tensors["v"]
        import_abstracts(self, layer, tensors)

    def end_import(self, length: int) -> None:
        super().end_import(length)
        if self.chunk_pages:  # chunk abstracts from the page abstracts, as prefill keeps them
            pages = torch.arange(0, -(-length // self.page_size), device=self.device, dtype=torch.int32)
            full = torch.tensor([length // self.page_size], device=self.device, dtype=torch.int32)
            for layer in range(self.cfg.num_layers):
                lo, hi = self._selection_abstracts(layer, self.positions.may_move)
                self.ops.update_chunk_abstracts(lo, hi, self.cmin[layer], self.cmax[layer], pages, full,
                                                self.chunk_pages)

    def memory_bytes(self) -> int:
        tensors = (self.k_pool, self.v_pool, self.kmin, self.kmax, self.page_table)
        if self.chunk_pages:
            tensors += (self.cmin, self.cmax)
        if self.positions.may_move:
            tensors += (self.rel_min, self.rel_max)
        return sum(t.numel() * t.element_size() for t in tensors)
