"""Page abstracts and the decode step's top-k page selection over them.

Every page of every layer keeps its per-channel key min/max on the GPU (``kmin``/``kmax``, from
the exact keys, also for fp8 pages). A rule whose queries may move to window positions
(lcrun.runtime.positions) keeps page-relative abstracts too (``rel_min``/``rel_max``), which rank
the far pages of a window step. Hierarchical selection (``chunk_pages`` > 0) keeps chunk
abstracts over groups of pages and scores only the pages of the best ``top_chunks`` chunks.
"""
from __future__ import annotations

import torch

from lcrun.kernels import KernelBackend, plan_selection
from lcrun.kernels.chunk_abstracts import chunk_abstracts_like
from lcrun.kernels.key_rotation import update_relative_abstracts
from lcrun.ranges import named_range
from lcrun.runtime.positions import PositionRule, decode_layout
from lcrun.runtime.rope import Rotary
from lcrun.runtime.tiered.config import TierConfig


class PageSelector:
    """kmin, kmax (and rel_min, rel_max when positions may move): (L, Hkv, max_pages, D) model
    dtype; cmin, cmax: chunk abstracts (chunk_abstracts_like) when ``chunk_pages``. ``ops`` (the
    page kernels) may be replaced, e.g. by a recording wrapper (perf/diag/tiered_reuse.py)."""

    def __init__(self, conf: TierConfig, ops: KernelBackend, rotary: Rotary, positions: PositionRule,
                 chunk_pages: int, top_chunks: int):
        self.conf, self.ops, self.rotary, self.positions = conf, ops, rotary, positions
        self.chunk_pages, self.top_chunks = chunk_pages, top_chunks
        cfg, dev = conf.cfg, conf.device
        self.kmin = torch.zeros((cfg.num_layers, cfg.num_kv_heads, conf.max_pages, cfg.head_dim), device=dev,
                                dtype=conf.dtype)
        self.kmax = torch.zeros_like(self.kmin)
        self.window_step = False  # this decode step's query sits at window positions
        if positions.may_move:  # page-relative abstracts, and the window step's layout [S, ls, shift]
            self.rel_min, self.rel_max = torch.zeros_like(self.kmin), torch.zeros_like(self.kmin)
            self.layout = torch.zeros(3, device=dev, dtype=torch.int32)
        if chunk_pages:
            self.cmin, self.cmax = chunk_abstracts_like(self.kmin, chunk_pages)
        # Selection maps pages through a table: the identity gives logical page ids.
        self.logical = torch.arange(conf.max_pages, device=dev, dtype=torch.int32)[None].expand(
            cfg.num_kv_heads, -1).contiguous()
        # The decode step's position, length, full pages and the page its token lands in: (1,) int32.
        self.start, self.seq_len, self.num_full, self.last_page = (
            torch.zeros(1, device=dev, dtype=torch.int32) for _ in range(4))
        self._plan = None

    def describe(self) -> str:
        return f"hierarchical {self.chunk_pages}x{self.top_chunks}" if self.chunk_pages else "flat"

    def plan_decode(self, positions: torch.Tensor, length: int) -> bool:
        """The step's per-layer metadata from its (1,) device position (graph-capturable), with
        ``length`` tokens cached; whether the step uses window positions."""
        P = self.conf.page_size
        self.start.copy_(positions[:1])
        torch.add(self.start, 1, out=self.seq_len)
        torch.floor_divide(self.seq_len, P, out=self.num_full)
        torch.floor_divide(self.start, P, out=self.last_page)
        self._plan = plan_selection(self.seq_len, self.conf.max_pages, P, self.conf.sink_tokens,
                                    self.conf.window_tokens, self.conf.budget, self.ops.selection_bounds)
        self.window_step = self.positions.window_at(length)
        if self.window_step:
            decode_layout(self._plan.bounds, P, self.layout)
        return self.window_step

    def _abstracts(self, layer: int, relative: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Page abstracts that rank pages: page-relative ones for window positions."""
        return (self.rel_min[layer], self.rel_max[layer]) if relative else (self.kmin[layer], self.kmax[layer])

    def select(self, layer: int, q1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scoring query q1 (Hq, D) post-RoPE -> logical pages and lengths (Hkv, Kmax) int32 of
        the sinks, the window and the top pages (length 0: unused entry)."""
        plan = self._plan
        kmin, kmax = self._abstracts(layer, self.window_step)
        # Chunk abstracts follow the page-relative abstracts when positions may move.
        if self.chunk_pages and (self.window_step or not self.positions.may_move):
            with named_range("topk"):
                return self.ops.select_top_pages_hier(q1, kmin, kmax, self.cmin[layer], self.cmax[layer],
                                                      self.num_full, self.logical, plan,
                                                      self.chunk_pages, self.top_chunks, self.conf.group_score)
        with named_range("score"):
            scores = self.ops.score_pages(q1, kmin, kmax, self.num_full, self.conf.group_score,
                                          candidates=plan.bounds)
        with named_range("topk"):  # the identity table makes the selected "slots" logical page ids
            return self.ops.select_top_pages(scores, self.logical, plan, masked=True)

    # -- keeping the abstracts current -------------------------------------------------------------
    def write_abstracts(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What the decode token's write-through updates in its launch: the true-position abstracts,
        read inside the trained window only (none for a window step)."""
        return (None, None) if self.window_step else (self.kmin[layer], self.kmax[layer])

    def after_decode_write(self, layer: int, k_pre: torch.Tensor) -> None:
        """The decode token's page-relative abstract (from its pre-RoPE key k_pre (1, Hkv, D)) and
        its chunk (which counts the page once the page is full)."""
        if self.positions.may_move:
            self.ops.update_relative_abstract(k_pre[0].to(self.conf.dtype), self.rotary.inv_freq,
                                              self.rel_min[layer], self.rel_max[layer], self.start,
                                              self.conf.page_size)
        if self.chunk_pages:
            lo, hi = self._abstracts(layer, self.positions.may_move)
            self.ops.update_chunk_abstracts(lo, hi, self.cmin[layer], self.cmax[layer], self.last_page,
                                            self.num_full, self.chunk_pages)

    def set_from_keys(self, layer: int, keys: torch.Tensor, first_page: int, end: int) -> None:
        """Min/max of pages first_page .. ceil(end / P) - 1 from ``keys`` (Hkv, >= end, D) post-RoPE,
        which hold every token of those pages (a partial last page: its tokens so far)."""
        P, hkv, d = self.conf.page_size, self.conf.cfg.num_kv_heads, self.conf.cfg.head_dim
        full = end // P
        if full > first_page:
            pages = keys[:, first_page * P:full * P].reshape(hkv, full - first_page, P, d)
            self.kmin[layer, :, first_page:full] = pages.amin(2)
            self.kmax[layer, :, first_page:full] = pages.amax(2)
        if end % P:
            part = keys[:, full * P:end]
            self.kmin[layer, :, full] = part.amin(1)
            self.kmax[layer, :, full] = part.amax(1)

    def add_relative(self, layer: int, k_pre: torch.Tensor, positions: torch.Tensor) -> None:
        """Prefill tokens' page-relative abstracts: k_pre (T, Hkv, D) pre-RoPE keys at ``positions`` (T,)."""
        update_relative_abstracts(k_pre.to(self.conf.dtype), positions, self.rotary.inv_freq, self.rel_min[layer],
                                  self.rel_max[layer], self.conf.page_size)

    def warm_scores(self, layer: int, q_last: torch.Tensor, end: int) -> torch.Tensor:
        """How much the GPU page cache should hold each page after a prefill of ``end`` tokens:
        (Hkv, max_pages) fp32, the prompt's last query q_last (Hq, D) post-RoPE at its true position
        against the true-position abstracts (pages it attends now are likely attended by the next
        tokens), +inf for the sinks and the local window (attended every step), -inf past the end."""
        P, dev = self.conf.page_size, self.conf.device
        num_full = torch.tensor([end // P], device=dev, dtype=torch.int32)
        scores = self.ops.score_pages(q_last.to(self.conf.dtype).contiguous(), self.kmin[layer], self.kmax[layer],
                                      num_full, self.conf.group_score)
        page = torch.arange(self.conf.max_pages, device=dev)
        always = (page < -(-self.conf.sink_tokens // P)) | (page >= max(0, end - self.conf.window_tokens) // P)
        return torch.where(always, float("inf"), scores).masked_fill(page >= -(-end // P), float("-inf"))

    def refresh_chunks(self, layer: int, first_page: int, end: int) -> None:
        """Hierarchical selection: the chunk abstracts of pages first_page .. ceil(end / P) - 1, with
        the pages full at ``end`` tokens counted."""
        if not self.chunk_pages:
            return
        P, dev = self.conf.page_size, self.conf.device
        pages = torch.arange(first_page, -(-end // P), device=dev, dtype=torch.int32)
        full = torch.tensor([end // P], device=dev, dtype=torch.int32)
        lo, hi = self._abstracts(layer, self.positions.may_move)
        self.ops.update_chunk_abstracts(lo, hi, self.cmin[layer], self.cmax[layer], pages, full, self.chunk_pages)

    def device_bytes(self) -> int:
        tensors = (self.kmin, self.kmax, self.logical)
        tensors += (self.cmin, self.cmax) if self.chunk_pages else ()
        tensors += (self.rel_min, self.rel_max) if self.positions.may_move else ()
        return sum(t.numel() * t.element_size() for t in tensors)
