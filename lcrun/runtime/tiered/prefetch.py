"""Speculative next-layer prefetch on a side CUDA stream.

While layer l computes, the prefetcher scores layer l+1's pages with a predicted query (as
InfiniGen: layer l's input through layer l+1's norm and query projection, which the residual
stream makes close to layer l+1's real input; or, ``layer``, layer l's own query) and admits the
predicted pages that are missing; layer l+1's attention waits for that admission only, never for
a host. A prefetched page that is not then selected costs link bandwidth the demand fetches need,
so with ``prefetch="auto"`` the first decode steps measure the prefetch's accuracy (the share of
its pages hit that step) and keep it only above PREFETCH_MIN_ACCURACY. CUDA only.
"""
from __future__ import annotations

from typing import Callable

import torch

from lcrun.errors import ConfigError
from lcrun.ranges import named_range
from lcrun.runtime.rope import Rotary
from lcrun.runtime.tiered.config import TierConfig, capturing
from lcrun.runtime.tiered.stats import TierStats

PREFETCH_PROBE_STEPS = 2       # decode steps that measure the prefetch in "auto" mode
# Below this accuracy the prefetch costs more than it saves: every wrong page takes the PCIe link
# from the demand fetches of the same step. With random weights the hidden-state predictor was
# 63-66% accurate (Llama-3.1-8B shape, 24 GiB cap: bench-h200-2026-11-28-topk-dense-transformers-24gib.json,
# kernels-h200-512k-24gib.json in perf/results); on the H100 at 128K it made decode slower than
# no prefetch (a session measurement not kept as a results file).
PREFETCH_MIN_ACCURACY = 0.8

Pages = tuple[torch.Tensor, torch.Tensor]  # (Hkv, Kmax) int32 logical pages and lengths


class Prefetcher:
    """select(layer, q (Hq, D) post-RoPE) -> Pages, and admit(layer, pages, lens) (speculative
    admission into the GPU page cache) are the store's; ``stats`` holds the counters the probe reads."""

    def __init__(self, conf: TierConfig, mode: str, select: Callable[[int, torch.Tensor], Pages],
                 admit: Callable[[int, torch.Tensor, torch.Tensor], None], stats: TierStats):
        if mode not in ("auto", "hidden", "layer", "off"):
            raise ConfigError(f"prefetch must be auto, hidden, layer or off, got {mode!r}")
        self.mode = mode
        self.enabled = mode != "off" and conf.cuda
        # How the next layer's query is predicted: from this layer's input through the next
        # layer's projection (hidden, InfiniGen), or this layer's own query (layer).
        self.predictor = "layer" if mode == "layer" else "hidden"
        self.decision: str | None = None  # auto: why the probe kept or dropped it
        self._select, self._admit, self._stats = select, admit, stats
        self._num_layers, self._device = conf.cfg.num_layers, conf.device
        self._forked = False   # the side stream has work of this step to join
        self._refs: list = []  # tensors (and closures holding them) the side stream reads
        self._into = [False] * self._num_layers  # layers this step prefetched into
        self.side = torch.cuda.Stream(conf.device) if conf.cuda else None
        self._admitted = [torch.cuda.Event() for _ in range(self._num_layers)] if conf.cuda else []

    def begin_decode_step(self) -> None:
        """auto mode: decide after the probe steps (not inside a capture: it syncs)."""
        if (self.enabled and self.mode == "auto" and self.decision is None
                and self._stats.decode_steps >= PREFETCH_PROBE_STEPS and not capturing()):
            self.decide()
        self._into = [False] * self._num_layers

    def wants_lookahead(self, layer: int) -> bool:
        return self.enabled and self.predictor == "hidden" and layer + 1 < self._num_layers

    def lookahead(self, layer: int, predict_next_query: Callable[[], torch.Tensor],
                  cos_sin: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Before layer l's attention: predict layer l+1's query (1, Hq, D) pre-RoPE from layer l's
        input, rotated with ``cos_sin`` as the next layer's selection scores, and prefetch its pages
        while layer l runs (the longest overlap a prediction allows)."""
        cos, sin = cos_sin

        def query() -> torch.Tensor:
            return Rotary.apply(predict_next_query(), cos, sin)[0].contiguous()
        self._speculate(layer + 1, query)
        self._refs.append(predict_next_query)  # holds the main-stream hidden state

    def after_attention(self, layer: int, q_sel: torch.Tensor) -> None:
        """``layer`` predictor: layer l's scoring query q_sel (Hq, D) selects layer l+1's pages."""
        if self.enabled and self.predictor == "layer" and layer + 1 < self._num_layers:
            self._speculate(layer + 1, lambda: q_sel)

    def wait_admitted(self, layer: int) -> None:
        """This step's predicted admissions into ``layer`` must land before the new token is written
        through, or a page being admitted could miss the token (its host copy read first, its tag
        set after the write checked it). Earlier steps' side work was joined at their end."""
        if self.enabled and self._into[layer]:
            torch.cuda.current_stream(self._device).wait_event(self._admitted[layer])

    def join(self) -> None:
        """End of a forward: the step's side work ends with the step."""
        if self._forked:
            torch.cuda.current_stream(self._device).wait_stream(self.side)
        # Joined only when forked: inside a graph capture, waiting on a stream the capture never
        # forked is an error.
        self._forked = False
        self._refs = []

    def _speculate(self, layer: int, query: Callable[[], torch.Tensor]) -> None:
        """On the side stream: select layer ``layer``'s pages with a predicted query and admit the
        missing ones; that layer's attention waits for this (an event), never for a host."""
        main = torch.cuda.current_stream(self._device)
        self.side.wait_stream(main)
        self._forked = True
        with torch.cuda.stream(self.side):
            with named_range("prefetch"):
                q = query()
                pages, lens = self._select(layer, q)
                self._admit(layer, pages, lens)
            self._into[layer] = True
            self._admitted[layer].record(self.side)
        # Tensors made on the main stream and read on the side stream stay referenced until the
        # streams join at the end of the step: freed earlier, the allocator could hand their
        # memory to a later main-stream tensor while the side stream still reads it (inside a
        # CUDA-graph capture record_stream does not protect them).
        self._refs += (pages, lens, q)

    def decide(self) -> None:
        """auto mode, after the probe steps (one sync): keep the speculative prefetch only if at
        least PREFETCH_MIN_ACCURACY of the pages it admitted were hits in the same step. Called
        before a decode step is captured as a CUDA graph (DecodeStepper) or when a step begins."""
        if self.mode != "auto" or self.decision is not None or not self.enabled:
            return
        fetched, used = int(self._stats.prefetched), int(self._stats.prefetch_hits)
        if fetched == 0:
            return  # nothing measured yet (no steps, or everything already cached): decide later
        accuracy = used / fetched
        self.enabled = accuracy >= PREFETCH_MIN_ACCURACY
        self.decision = (f"{'kept' if self.enabled else 'off'}: {accuracy:.0%} of {fetched} "
                         f"prefetched pages were used (threshold {PREFETCH_MIN_ACCURACY:.0%})")
