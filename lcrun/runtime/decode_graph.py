"""One decode step captured as a CUDA graph and replayed, so a step costs its GPU time rather
than hundreds of Python-launched kernels. Caches that keep every per-step quantity on the device
(``graph_safe_decode``) can be captured; the others, and the CPU, run eagerly. A cache whose step
changes shape (``decode_graph_key``: true vs window positions) gets a new capture when it does."""
from __future__ import annotations

import os

import torch

from lcrun.runtime.kv_cache import AttentionCache
from lcrun.runtime.model import LlamaModel


class DecodeStepper:
    def __init__(self, model: LlamaModel, cache: AttentionCache, use_graph: bool = True):
        self.model, self.cache = model, cache
        # LCRUN_CUDA_GRAPH: 0 = never, force = also caches not marked safe (for testing them).
        mode = os.environ.get("LCRUN_CUDA_GRAPH", "auto")
        safe = cache.graph_safe_decode or mode == "force"
        self.use_graph = use_graph and mode != "0" and model.device.type == "cuda" and safe
        self.graph: torch.cuda.CUDAGraph | None = None
        self._graph_key: object = None
        self._eager_steps = 0

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token: (1,) int64 on the model's device, the last sampled token -> fp32 logits (vocab,).
        A step that read pages which arrived late (the cache's settle_decode_step) runs again."""
        logits = self._step(token)
        while self.cache.settle_decode_step():
            logits = self._step(token)
        return logits

    def _step(self, token: torch.Tensor) -> torch.Tensor:
        key = self.cache.decode_graph_key()
        if self.graph is not None and key != self._graph_key:
            self.graph = None  # the step's shape changed (e.g. it passed the trained window): capture anew
            self._eager_steps = 0
        if not self.use_graph or self._eager_steps < 2:
            # Eager steps first: Triton compiles, cuBLAS sets up, then the step can be captured.
            self._eager_steps += 1
            return self.model.forward(token, self.cache)[-1]
        if self.graph is None:
            self._static_token = token.clone()
            self._static_pos = torch.tensor([self.cache.length], device=self.model.device)
            self.cache.before_capture()  # settle what the eager steps measured: the graph fixes it
            self._graph_key = key
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the NVMe promoter and spill threads keep querying and syncing their
            # events while this thread captures; in the default global mode that would
            # invalidate the capture.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self._logits = self.model.forward(self._static_token, self.cache, positions=self._static_pos)
            # Capture ran no kernel but did the host bookkeeping of one step; replay runs it.
            self.graph.replay()
            return self._logits[-1]
        self._static_token.copy_(token)
        self._static_pos.fill_(self.cache.length)
        self.cache.begin_replay(1)
        self.graph.replay()
        self.cache.end_forward()
        return self._logits[-1]
