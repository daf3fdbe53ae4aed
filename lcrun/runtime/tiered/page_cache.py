"""The GPU page cache: a direct-mapped cache of pages per layer over their host homes.

Page (h, p) of a layer may occupy one slot only, ``cache_slot[h, p]``, and is cached iff that
slot's tag is its flat id h * max_pages + p. Consecutive pages of a head take consecutive slots,
heads offset from each other, so the recent window and the sinks of all heads never collide while
the cache holds a step. Eviction never writes back (the homes are written through), so a decode
step admits the selected pages it misses (one zero-copy read of each from pinned host memory)
and then attends from GPU memory only; a page that lost its slot to a conflict with another
selected page goes to an overflow slot for that step only. While a prefill runs, the cache is
emptied and its memory is lent out (``lend``) as the prefill's staging area.
"""
from __future__ import annotations

import math

import torch

from lcrun.kernels import plan_selection
from lcrun.runtime.tiered.codec import PageCodec
from lcrun.runtime.tiered.config import TierConfig, tier_kernels
from lcrun.runtime.tiered.homes import HostHomes

LEND_ALIGN = 256  # bytes: lent tensors suit any dtype and vector loads


class GpuPageCache:
    """gpu_k/gpu_v: (L, S, P, D) store dtype, S = ``slots`` per layer; tag, spec_mark: (L, S) int32
    (-1: empty / never prefetched); cache_slot: (Hkv, max_pages) int32, the same for every layer."""

    def __init__(self, conf: TierConfig, homes: HostHomes, codec: PageCodec, slots: int):
        self.conf, self.homes, self.codec = conf, homes, codec
        self.kernels = tier_kernels(conf.device)
        L, hkv, d, P = conf.cfg.num_layers, conf.cfg.num_kv_heads, conf.cfg.head_dim, conf.page_size
        self.slots = S = slots
        # One allocation per K and V: L layers of S cache slots, then the overflow slots where a
        # decode step's demand admission puts pages that lost their slot to a conflict (one per
        # selection entry, shared by all layers: a layer's attention reads them right away).
        kmax = plan_selection(torch.ones(1, dtype=torch.int32), conf.max_pages, P, conf.sink_tokens,
                              conf.window_tokens, conf.budget, fold=True).kmax
        self._overflow = L * S
        self._pool_k = torch.zeros((L * S + hkv * kmax, P, d), device=conf.device, dtype=codec.store_dtype)
        self._pool_v = torch.zeros_like(self._pool_k)
        self.gpu_k = self._pool_k[:L * S].view(L, S, P, d)
        self.gpu_v = self._pool_v[:L * S].view(L, S, P, d)
        self._read_slot = torch.zeros((hkv, kmax), device=conf.device, dtype=torch.int32)
        self._read_lens = torch.zeros_like(self._read_slot)
        self.tag = torch.full((L, S), -1, device=conf.device, dtype=torch.int32)
        self.cache_slot = (torch.arange(hkv * conf.max_pages, device=conf.device, dtype=torch.int64) % S).to(
            torch.int32).view(hkv, conf.max_pages)
        # The decode step's number, on the device (a replayed step counts itself), and per slot the
        # step whose speculative prefetch filled it: hits on those measure the prefetch.
        self._step = torch.zeros(1, device=conf.device, dtype=torch.int32)
        self.spec_mark = torch.full((L, S), -1, device=conf.device, dtype=torch.int32)
        self._lend_at = (2, 0)  # (pool, byte offset) of the next lent tensor; pool 2: nothing to lend

    def next_step(self) -> None:
        """A decode step begins (on the device: graph-capturable)."""
        self._step.add_(1)

    def write_through(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor,
                      kmin: torch.Tensor | None = None, kmax: torch.Tensor | None = None) -> None:
        """Tokens k, v (T, Hkv, D) model dtype, post-RoPE keys, at positions start.. into their host
        pages and the cached copies of those pages (lcrun.kernels.tiered.write_through); kmin/kmax
        (Hkv, max_pages, D): a decode token's page abstracts, updated in the same launch."""
        self.kernels.write_through(k, v, start, self.homes.host_kv[layer], self.homes.host_slot[layer],
                                   self.gpu_k[layer], self.gpu_v[layer], self.cache_slot, self.tag[layer],
                                   kmin, kmax, kv_scale=self.codec.scales(layer))

    def admit(self, layer: int, pages: torch.Tensor, lens: torch.Tensor, counters: torch.Tensor,
              speculative: bool = False) -> None:
        """Selected pages (Hkv, Kmax) int32 logical ids, lens (Hkv, Kmax) int32 (0: unused entry)
        missing from the cache come in from the host pool; the kernel also counts hits into
        ``counters`` (demand) or marks what it prefetched (speculative)."""
        self.kernels.admit_pages(pages, lens, self.cache_slot, self.tag[layer], self.homes.host_slot[layer],
                                 self.homes.host_kv[layer], self.gpu_k[layer], self.gpu_v[layer], counters,
                                 self.spec_mark[layer], self._step, speculative)

    def admit_for_attention(self, layer: int, pages: torch.Tensor, lens: torch.Tensor, counters: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Demand admission that also maps every readable selected page to a GPU slot for this
        step (conflict losers into the overflow slots). Returns the layer's pool (K, V: (n, P, D),
        its cache slots onwards, overflow included) and the (Hkv, Kmax) int32 slots and lens to
        attend over (length 0: an unused entry, or a page in no readable tier)."""
        S = self.slots
        pool_k, pool_v = self._pool_k[layer * S:], self._pool_v[layer * S:]
        self.kernels.admit_pages(pages, lens, self.cache_slot, self.tag[layer], self.homes.host_slot[layer],
                                 self.homes.host_kv[layer], pool_k, pool_v, counters, self.spec_mark[layer],
                                 self._step, False, self._read_slot, self._read_lens, self._overflow - layer * S)
        return pool_k, pool_v, self._read_slot, self._read_lens

    def fill(self, layer: int, pages: torch.Tensor, scores: torch.Tensor) -> int:
        """Fill every slot of ``layer`` with the page of highest score that maps to it (a whole
        layer's pages in one admission, e.g. after a prefill, which empties the cache). pages:
        (Hkv, max_pages) int32 logical ids (the identity table); scores: (Hkv, max_pages) fp32, -inf
        for pages not to cache. Pages without a host copy (on NVMe only) are skipped. Returns how
        many pages were read from the host pool, a 0-dim device tensor (no sync)."""
        slot, flat_score = self.cache_slot.flatten().long(), scores.flatten()
        best = torch.full((self.slots,), float("-inf"), device=scores.device).scatter_reduce(
            0, slot, flat_score, "amax")
        chosen = (flat_score == best[slot]) & (flat_score > float("-inf"))
        # One page per slot (the admission then needs no conflict scan): ties go to the highest id.
        flat_id = torch.arange(slot.numel(), device=slot.device)
        winner = torch.full((self.slots,), -1, device=slot.device).scatter_reduce(
            0, slot, torch.where(chosen, flat_id, -1), "amax")
        chosen &= winner[slot] == flat_id
        readable = chosen & (self.homes.host_slot[layer].flatten() >= 0)
        lens = torch.where(chosen, self.conf.page_size, 0).to(torch.int32).view_as(pages)
        self.kernels.admit_pages(pages, lens, self.cache_slot, self.tag[layer], self.homes.host_slot[layer],
                                 self.homes.host_kv[layer], self.gpu_k[layer], self.gpu_v[layer], distinct=True)
        return readable.sum()

    # -- the cache's memory, lent to a prefill -----------------------------------------------------
    def start_lending(self) -> None:
        """Empty the cache; its memory is lent from the start (a bump allocator, reset per prefill)."""
        self.tag.fill_(-1)
        self._lend_at = (0, 0)

    def stop_lending(self) -> None:
        """Lend nothing more until the next ``start_lending``."""
        self._lend_at = (2, 0)

    def lend(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A tensor from the cache's memory (K pool, then V pool, as bytes: the pages may be fp8),
        or None when it does not fit. Valid until the cache admits pages again (decode)."""
        nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        for i, storage in enumerate((self.gpu_k, self.gpu_v)):
            if i < self._lend_at[0]:
                continue
            offset = self._lend_at[1] if i == self._lend_at[0] else 0
            offset = -(-offset // LEND_ALIGN) * LEND_ALIGN
            raw = storage.view(-1).view(torch.uint8)
            if offset + nbytes <= raw.numel():
                self._lend_at = (i, offset + nbytes)
                return raw[offset:offset + nbytes].view(dtype).view(shape)
        return None

    def resident_pages(self) -> int:
        """Pages cached now, every layer (synchronises)."""
        return int((self.tag >= 0).sum())

    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gpu_k, self.gpu_v, self.tag, self.cache_slot))
