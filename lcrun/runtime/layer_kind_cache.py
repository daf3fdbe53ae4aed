"""One AttentionCache over two per-layer-kind caches: Gemma 3's local (sliding-window) layers in a
RingCache of their window, its global layers in the run's cache (dense, paged top-k or tiered),
built for the global layers only. The model's layer index maps to each cache's own index, so
neither knows the other exists; everything else in the contract goes to both (or to the one it
concerns: layer-major prefill, shared selections, lookahead are the global cache's).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from lcrun.runtime.kv_cache import AttentionCache
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.ring_cache import RingCache


def context_cache(cache: AttentionCache) -> AttentionCache:
    """The cache holding the context-long KV (pages, tiers, counters): a LayerKindCache's global
    layers' cache, else ``cache`` itself. For reports that count pages."""
    return cache.global_ if isinstance(cache, LayerKindCache) else cache


def fixed_kv_bytes(cache: AttentionCache) -> int:
    """KV bytes a decode step reads whatever the context: a LayerKindCache's local rings, else 0."""
    return cache.local.memory_bytes() if isinstance(cache, LayerKindCache) else 0


def with_local_ring(cfg: ModelConfig, capacity: int, device, dtype: torch.dtype,
                    make_global: Callable[[ModelConfig], AttentionCache]) -> AttentionCache:
    """make_global(cfg) for a model without sliding-window layers; otherwise a LayerKindCache of
    a RingCache for them and make_global(cfg.global_view()) for the global layers."""
    if not cfg.local_layers:
        return make_global(cfg)
    local = RingCache(cfg.local_view(), capacity, min(cfg.sliding_window, capacity), device, dtype)
    return LayerKindCache(cfg, local, make_global(cfg.global_view()))


class LayerKindCache(AttentionCache):
    def __init__(self, cfg: ModelConfig, local: RingCache, global_: AttentionCache):
        """cfg: the whole model's config; local/global_: built for cfg.local_view() / global_view()."""
        super().__init__(cfg, global_.capacity, global_.device, global_.dtype)
        self.local, self.global_ = local, global_
        self._route: list[tuple[AttentionCache, int]] = [(local, 0)] * cfg.num_layers
        for j, i in enumerate(cfg.local_layers):
            self._route[i] = (local, j)
        for j, i in enumerate(cfg.global_layers):
            self._route[i] = (global_, j)
        # the global cache's index of model layer i + 1 when that layer is global (for lookahead)
        self._next_global = {i - 1: j for j, i in enumerate(cfg.global_layers) if i > 0}

    @property
    def graph_safe_decode(self) -> bool:
        return self.local.graph_safe_decode and self.global_.graph_safe_decode

    @property
    def layerwise_prefill(self) -> bool:
        return self.global_.layerwise_prefill

    def begin_forward(self, positions: torch.Tensor) -> None:
        super().begin_forward(positions)
        self.local.begin_forward(positions)
        self.global_.begin_forward(positions)

    def begin_layerwise(self, positions: torch.Tensor) -> None:
        self.local.begin_layerwise(positions)
        self.global_.begin_layerwise(positions)

    def prefill_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        return self.global_.prefill_buffer(shape, dtype)

    def _plan(self, positions: torch.Tensor) -> None:
        pass  # each cache plans its own step in begin_forward

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache, index = self._route[layer]
        return cache.attend(index, q, k, v)

    def end_forward(self) -> None:
        self.local.end_forward()
        self.global_.end_forward()
        self._pending = 0
        self.length = self.global_.length

    def begin_replay(self, n: int) -> None:
        self.local.begin_replay(n)
        self.global_.begin_replay(n)

    def settle_decode_step(self) -> bool:
        again = self.global_.settle_decode_step()
        if again:  # the global cache forgot the step's token: so does the ring (one token: lossless)
            self.local.truncate(self.global_.length)
            self.length = self.global_.length
        return again

    def moves_queries(self, end: int) -> bool:
        return self.global_.moves_queries(end)

    def begin_prefill(self, end: int) -> None:
        self.global_.begin_prefill(end)

    def report(self) -> dict[str, Any]:
        return self.global_.report()

    def shares_prefill_selection(self, end: int) -> bool:
        return self.global_.shares_prefill_selection(end)

    def decode_graph_key(self) -> object:
        return self.global_.decode_graph_key()

    def before_capture(self) -> None:
        self.local.before_capture()
        self.global_.before_capture()

    def wants_lookahead(self, layer: int) -> bool:
        nxt = self._next_global.get(layer)
        return bool(nxt) and self.global_.wants_lookahead(nxt - 1)  # nxt 0: nothing precedes it

    def lookahead(self, layer: int, predict_next_query: Callable[[], torch.Tensor]) -> None:
        self.global_.lookahead(self._next_global[layer] - 1, predict_next_query)

    def truncate(self, length: int) -> None:
        """The ring may forget more than asked (RingCache.truncate); the global cache follows it."""
        self.local.truncate(length)
        self.global_.truncate(min(length, self.local.length))
        self.local.truncate(self.global_.length)
        self.length = self.global_.length

    def close(self) -> None:
        self.local.close()
        self.global_.close()

    def memory_bytes(self) -> int:
        return self.local.memory_bytes() + self.global_.memory_bytes()

    # -- saved contexts: each model layer from the cache that holds it
    def snapshot_layout(self) -> dict:
        return {"cache": "layer-kind", "local": self.local.snapshot_layout(), "global": self.global_.snapshot_layout()}

    def begin_export(self) -> None:
        self.local.begin_export()
        self.global_.begin_export()

    def end_export(self) -> None:
        self.local.end_export()
        self.global_.end_export()

    def export_layer(self, layer: int) -> dict[str, torch.Tensor]:
        cache, index = self._route[layer]
        return cache.export_layer(index)

    def begin_import(self, length: int) -> None:
        self.local.begin_import(length)
        self.global_.begin_import(length)
        self.length = 0

    def import_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        cache, index = self._route[layer]
        cache.import_layer(index, tensors)

    def end_import(self, length: int) -> None:
        self.local.end_import(length)
        self.global_.end_import(length)
        self.length = length
