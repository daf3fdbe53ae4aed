"""TieredTopKCache: the tiered KV store behind the attention seam (lcrun.runtime.kv_cache).

Every page has its home in the pinned host pool (or on NVMe, ``homes``); the GPU holds a
direct-mapped cache of pages per layer (``page_cache``) and the abstracts of every page
(``selection``). This class wires the parts together and implements the AttentionCache contract.

Decode, per layer (no host synchronisation; per-step metadata built once in ``_plan``, so the
step can be captured as a CUDA graph): score all full pages -> select sinks + window + top pages
-> admit the missed pages into the GPU cache -> attend from GPU memory only
(sparse_decode_attention). Each missed page crosses PCIe once, and stays cached for the next
steps. The prefetcher (``prefetch``) may admit the next layer's pages early on a side stream.
Prompts are prefilled layer by layer (``begin_layerwise``, ``prefill``); a prompt's last token
may run alone as a decode step. With an NVMe tier, a decode step that found selected pages still
on disk runs again once they arrive (``settle_decode_step``, ``settle``).
"""
from __future__ import annotations

from typing import Callable

import torch

from lcrun.errors import ConfigError
from lcrun.kernels import KernelBackend, kernel_backend
from lcrun.kernels.key_rotation import KeyRotation
from lcrun.ranges import named_range
from lcrun.runtime.kv_cache import AttentionCache
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.paged_cache import export_abstracts, import_abstracts, resolve_chunk_pages, snapshot_positions
from lcrun.runtime.positions import PositionRule
from lcrun.runtime.rope import Rotary
from lcrun.runtime.tiered import stats as tier_stats
from lcrun.runtime.tiered.codec import PageCodec
from lcrun.runtime.tiered.config import TierConfig
from lcrun.runtime.tiered.homes import HostHomes
from lcrun.runtime.tiered.page_cache import GpuPageCache
from lcrun.runtime.tiered.prefetch import Prefetcher
from lcrun.runtime.tiered.prefill import LayerwisePrefill
from lcrun.runtime.tiered.selection import PageSelector
from lcrun.runtime.tiered.settle import DecodeSettler
from lcrun.runtime.tiered.stats import TierStats


def _prompt_error(tokens: int) -> RuntimeError:
    return RuntimeError(f"the tiered KV store prefills prompts layer by layer: run {tokens} tokens through "
                        "begin_layerwise (LlamaModel.forward_layerwise, as the Generator does); begin_forward "
                        "and attend outside it take single tokens (decode steps)")


class TieredTopKCache(AttentionCache):
    graph_safe_decode = True  # every per-step quantity of a decode step lives on the device
    layerwise_prefill = True  # the Generator prefills through begin_layerwise (model.forward_layerwise)

    def __init__(self, cfg: ModelConfig, capacity: int, device, dtype, *, cache_slots_per_layer: int,
                 page_size: int = 32, budget: int = 2048, sink_tokens: int = 64, window_tokens: int = 512,
                 group_score: str = "max", prefetch: str = "auto",
                 backend: str = "auto", host_slots_per_layer: int | None = None, kv_dir: str | None = None,
                 nvme_slots: int | None = None, promotion_reserve: int | None = None,
                 sparse_prefill: bool = False, kv_dtype: torch.dtype | None = None,
                 chunk_pages: int | str = "auto", top_chunks: int = 32, positions: PositionRule = PositionRule(None)):
        """cache_slots_per_layer: GPU page cache slots per layer. host_slots_per_layer, kv_dir,
        nvme_slots, promotion_reserve: the host pool and the NVMe tier (HostHomes).
        sparse_prefill: prefill chunks attend to sinks, window and their top pages within
        ``budget`` instead of the whole past. prefetch: speculative next-layer prefetch with the
        query predicted from the layer's input ("hidden", needs the model to call ``lookahead``) or
        the layer's own query ("layer"), "off", or "auto" (probe "hidden", then decide: Prefetcher);
        only on CUDA. kv_dtype: how pages are stored in the host pool, on NVMe and in the GPU page
        cache: the model dtype (default) or torch.float8_e4m3fn (half the bytes per page, so twice
        the pages per GPU byte and half the PCIe bytes per miss; per-head scales, PageCodec);
        attention reads fp8 pages as code * scale; page abstracts come from the exact keys (of a page a
        later prompt continues: from its stored past).
        chunk_pages, top_chunks: hierarchical selection as in PagedTopKCache (chunk abstracts of
        chunk_pages pages scored first, then the pages of the best top_chunks chunks); "auto": from
        AUTO_MIN_PAGES pages per KV head (256K tokens at page 32), flat below.
        positions: when queries move to window positions (lcrun.runtime.positions), as in
        PagedTopKCache: pages keep keys at true positions and the decode kernel rotates at read.
        backend: the page kernels (lcrun.kernels.backend): auto | triton | torch."""
        super().__init__(cfg, capacity, device, dtype)
        if cache_slots_per_layer < 1:
            raise ConfigError("the GPU page cache needs at least one slot per layer")
        conf = TierConfig(cfg, capacity, self.device, dtype, page_size, budget, sink_tokens, window_tokens,
                          group_score)
        self.page_size, self.max_pages, self.cache_slots = page_size, conf.max_pages, cache_slots_per_layer
        self.positions, self.sparse_prefill, self.sm_scale = positions, sparse_prefill, conf.sm_scale
        self.stats = TierStats(counters=torch.zeros(5, device=self.device, dtype=torch.int64))
        # Settings are checked before the host pool is allocated.
        self.codec = PageCodec(cfg.num_layers, cfg.num_kv_heads, page_size, cfg.head_dim, self.device, dtype,
                               kv_dtype)
        self.prefetcher = Prefetcher(conf, prefetch, self._select, self._prefetch_admit, self.stats)
        ops = kernel_backend(self.device, backend)
        chunk_pages = resolve_chunk_pages(chunk_pages, conf.max_pages, top_chunks)
        self.homes = HostHomes(conf, self.codec, host_slots_per_layer, kv_dir, nvme_slots, promotion_reserve)
        self.spills = self.homes.spills
        self.settler = DecodeSettler(self.homes, self.stats)
        self.pages = GpuPageCache(conf, self.homes, self.codec, cache_slots_per_layer)
        self.selector = PageSelector(conf, ops, self.rotary, positions, chunk_pages, top_chunks)
        self.prefill = LayerwisePrefill(conf, self.rotary, positions, self.pages, self.homes, self.codec,
                                        self.selector, self.stats, sparse_prefill)
        self._layerwise = False  # a begin_layerwise prefill is running

    @property
    def ops(self) -> KernelBackend:
        """The page kernels (selection, decode attention); replaceable, e.g. by a recording wrapper."""
        return self.selector.ops

    @ops.setter
    def ops(self, ops: KernelBackend) -> None:
        self.selector.ops = ops

    # The prefetcher's view of the store (it is made before the selector and the page cache).
    def _select(self, layer: int, q1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.selector.select(layer, q1)

    def _prefetch_admit(self, layer: int, pages: torch.Tensor, lens: torch.Tensor) -> None:
        self.pages.admit(layer, pages, lens, self.stats.counters, speculative=True)

    # -- per forward -------------------------------------------------------------------------------
    def moves_queries(self, end: int) -> bool:
        return self.positions.passes(end)

    def begin_prefill(self, end: int) -> None:
        self.prefill.prompt_end = end

    def begin_layerwise(self, positions: torch.Tensor) -> None:
        """Start a prefill that the caller runs layer-major: for each layer, ``attend`` on every
        chunk of ``positions`` in order; then ``end_forward``. The GPU page cache is emptied and
        its memory holds one layer's K/V for the whole context meanwhile."""
        self._layerwise = True
        try:
            self.begin_forward(positions)
        except BaseException:
            self._layerwise = False
            raise
        self.prefill.begin(positions, self.length)

    def prefill_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """Room for the prefill's hidden states in the page cache memory beyond the staging area
        (None when it does not fit: the caller allocates)."""
        return self.pages.lend(shape, dtype)

    def _plan(self, positions: torch.Tensor) -> None:
        if self._layerwise:  # the prefill rotates chunk by chunk (a whole prompt's cos/sin: 0.5 GiB at 1M)
            return
        self._cos_sin = self.rotary.cos_sin(positions, self.dtype)
        if positions.numel() != 1:
            raise _prompt_error(positions.numel())
        self.settler.before_step(self.length)
        self.prefetcher.begin_decode_step()
        self.pages.next_step()
        window = self.selector.plan_decode(positions, self.length)  # from the device: graph-capturable
        self._key_cos_sin = self._score_cos_sin = self._cos_sin
        if window:
            # Key written at its true position; the query at c - shift, scored at its distance
            # to the far pages (lcrun.runtime.positions).
            layout = self.selector.layout
            q_pos = positions - layout[2]
            self._cos_sin = self.rotary.cos_sin(q_pos, self.dtype)
            self._score_cos_sin = self.rotary.cos_sin(q_pos - layout[0], self.dtype)
        self.stats.decode_steps += 1  # host count; replays add theirs in begin_replay

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self._layerwise:
            return self.prefill.attend(layer, q, k, v)
        if q.shape[0] != 1:
            raise _prompt_error(q.shape[0])
        # A decode step: q (1, Hq, D), k/v (1, Hkv, D). q1 attends, q_sel scores the pages.
        window = self.selector.window_step
        k_pre = k
        if window:
            q1, k, q_sel = Rotary.apply_window(q, k, self._cos_sin, self._key_cos_sin, self._score_cos_sin)
            q1, q_sel = q1[0], q_sel[0]
        else:
            q, k = Rotary.apply_qk(q, k, *self._cos_sin)
            q1 = q_sel = q[0].contiguous()
        k, v = k.to(self.dtype), v.to(self.dtype)
        self.prefetcher.wait_admitted(layer)
        with named_range("kv_write"):
            if self.length == 0:
                self.codec.set_scales(layer, k, v, token_dim=0)
            self.pages.write_through(layer, k, v, self.selector.start, *self.selector.write_abstracts(layer))
            self.selector.after_decode_write(layer, k_pre)
        pages, lens = self.selector.select(layer, q_sel)
        self.settler.log_selection(layer, pages, lens)
        # Demand admission first, then attention from GPU memory only: each missed page crosses
        # PCIe once (attending zero-copy and admitting afterwards read it twice), and no
        # attention program waits on a host read.
        with named_range("fetch.host"):
            pool_k, pool_v, slots, read_lens = self.pages.admit_for_attention(layer, pages, lens, self.stats.counters)
        with named_range("attend"):
            rotation = KeyRotation(self.rotary.inv_freq, pages, 0, self.selector.layout) if window else None
            out = self.ops.sparse_decode_attention(q1, pool_k, pool_v, slots, read_lens, self.sm_scale,
                                                   kv_scale=self.codec.scales(layer), rotation=rotation)
        self.prefetcher.after_attention(layer, q_sel)
        return out[None]

    def end_forward(self) -> None:
        self.prefetcher.join()
        decode = self._pending == 1 and not self._layerwise
        if self._layerwise:
            self._layerwise = False
            self.prefill.end()
        super().end_forward()
        self.settler.after_forward(decode, self.length)

    def begin_replay(self, n: int) -> None:
        self.settler.before_step(self.length)
        super().begin_replay(n)
        self.stats.decode_steps += 1

    def settle_decode_step(self) -> bool:
        """After each decode step: True when it read pages still on NVMe, which have now arrived;
        the step's token is forgotten (``length`` is one less) and the caller runs it again
        (DecodeSettler.settle)."""
        if self.settler.settle(self.length):
            self.truncate(self.length - 1)
            return True
        return False

    def truncate(self, length: int) -> None:
        """Forget tokens from ``length`` on. Their K/V stay where they were written and are written
        again (the same bytes for the same token) when the position is decoded anew."""
        self.length = min(self.length, length)

    # -- what the model, the generator and the decode graph ask ------------------------------------
    def shares_prefill_selection(self, end: int) -> bool:
        """Sparse prefill selects once per chunk, window prefill once per block of queries."""
        return self.sparse_prefill or self.positions.window_at(end - 1)

    def decode_graph_key(self) -> object:
        return "window" if self.positions.window_at(self.length) else "true"

    def before_capture(self) -> None:
        self.prefetcher.decide()

    def wants_lookahead(self, layer: int) -> bool:
        return self._pending == 1 and not self._layerwise and self.prefetcher.wants_lookahead(layer)

    def lookahead(self, layer: int, predict_next_query: Callable[[], torch.Tensor]) -> None:
        self.prefetcher.lookahead(layer, predict_next_query, self._score_cos_sin)

    # -- saved contexts: one layer at a time through the prefill's staging area ---------------------
    def snapshot_layout(self) -> dict:
        return {"cache": "tiered", "dtype": str(self.dtype), "page_size": self.page_size,
                "kv_dtype": self.codec.name, "positions": snapshot_positions(self.positions)}

    def begin_export(self) -> None:
        self.prefill.begin_staging()

    def end_export(self) -> None:
        self.prefill.end()

    def export_layer(self, layer: int) -> dict[str, torch.Tensor]:
        k, v = self.prefill.export_layer(layer, self.length)
        out = {"k": k, "v": v, **export_abstracts(self.selector, layer, -(-self.length // self.page_size))}
        if self.codec.kv_scale is not None:
            out["kv_scale"] = self.codec.kv_scale[layer]
        return out

    def begin_import(self, length: int) -> None:
        super().begin_import(length)
        self.prefill.begin_staging()

    def import_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        self.prefill.restore_layer(layer, tensors["k"], tensors["v"], tensors.get("kv_scale"))
        import_abstracts(self.selector, layer, tensors)  # as saved (a window step leaves kmin/kmax be)
        self.selector.refresh_chunks(layer, 0, tensors["k"].shape[1])

    def end_import(self, length: int) -> None:
        self.prefill.end()
        super().end_import(length)
        self.settler.after_forward(False, length)

    # -- memory and reports ------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        scales = self.codec.kv_scale
        return (self.pages.device_bytes() + self.selector.device_bytes() + self.homes.device_bytes()
                + (scales.numel() * scales.element_size() if scales is not None else 0))

    def host_bytes(self) -> int:
        return self.homes.host_pool.nbytes

    def report(self) -> dict:
        """Hit rate and bytes moved (one sync: call after a run, not inside it)."""
        store = {"selection": self.selector.describe(), "gpu_cache_slots_per_layer": self.cache_slots,
                 "kv_dtype": self.codec.name}
        return tier_stats.report(self.stats, self.homes, prefetch=(self.prefetcher.mode, self.prefetcher.decision),
                                 store=store, wait_bound=(self.settler.wait_s, self.settler.max_redos))

    def step_counters(self) -> dict:
        """Cumulative counters for lcrun profile (synchronises: call between steps)."""
        return tier_stats.step_counters(self.stats, self.homes, pages_gpu=self.pages.resident_pages(),
                                        length=self.length)

    def close(self) -> None:
        self.homes.close()
