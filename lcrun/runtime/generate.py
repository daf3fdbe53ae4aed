"""Chunked prefill and the decode loop over a model and its attention cache.

The generator remembers which token ids sit in the cache, so a chat turn only prefills what is
new since the last turn (the common prefix of the re-rendered conversation is reused)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from lcrun.errors import ContextOverflowError
from lcrun.ranges import named_range
from lcrun.runtime.decode_graph import DecodeStepper
from lcrun.runtime.kv_cache import AttentionCache
from lcrun.runtime.model import LlamaModel
from lcrun.runtime.sampling import Sampler, SamplingParams

# (tokens done, tokens total); called with done = 0 before the work starts, so a bar shows from
# the start and its rate and time left count all of it
ProgressFn = Callable[[int, int], None]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = ""  # "stop" (stop token or string), "length" (max_new_tokens) or "context" (context full)


class Generator:
    def __init__(self, model: LlamaModel, cache: AttentionCache, prefill_chunk: int = 2048):
        self.model = model
        self.cache = cache
        self.prefill_chunk = prefill_chunk
        self.cached_ids: list[int] = []  # exactly the tokens whose K/V the cache holds
        self.true_tokens = 0  # how many of them were computed at true positions (lcrun.runtime.positions)
        self.stepper = DecodeStepper(model, cache)
        self.last_stats = GenerationStats()

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def reset(self) -> None:
        self.cache.reset()
        self.cached_ids = []
        self.true_tokens = 0

    def restored(self, ids: list[int]) -> None:
        """The cache now holds ``ids`` (a saved context), computed as one prompt."""
        self.cached_ids = list(ids)
        self.true_tokens = 0 if self.cache.moves_queries(len(ids)) else len(ids)

    def check_fits(self, n_tokens: int) -> None:
        # Room for the prompt plus at least one generated token.
        if n_tokens + 1 > self.capacity:
            raise ContextOverflowError(
                f"the input is {n_tokens} tokens, over the context of {self.capacity} tokens by "
                f"{n_tokens + 1 - self.capacity} (one token is kept free to answer): raise --ctx "
                "or shorten the input; nothing was truncated")

    def prefill(self, ids: list[int], progress: ProgressFn | None = None) -> torch.Tensor:
        """Make the cache hold exactly ``ids``; returns fp32 logits (vocab,) after the last one."""
        self.check_fits(len(ids))
        common = 0
        for a, b in zip(self.cached_ids, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # recompute at least one token to get its logits
        if self.cache.moves_queries(len(ids)) and min(self.true_tokens, common) > 0:
            # The prompt passes the trained window: tokens computed at true positions would be read
            # at window positions, where they are found poorly. Compute them there, once.
            common = 0
        self.cache.truncate(common)
        common = self.cache.length  # a cache may forget more than asked (a ring of local layers)
        self.cached_ids = ids[:common]
        self.true_tokens = min(self.true_tokens, common)
        self.cache.begin_prefill(len(ids))
        self.last_stats = GenerationStats(prompt_tokens=len(ids), reused_tokens=common)
        device = self.model.device
        todo = torch.tensor(ids[common:], dtype=torch.long, device=device)
        logits = None
        # A cache whose prefill shares one page selection among a block of queries dilutes the
        # last token's query, and that token's logits pick the first answer token: it gets its
        # own selection, as every decode step has (window passkey at 2K: wrong -> right).
        last_alone = self.cache.shares_prefill_selection(len(ids)) and todo.numel() > 1
        body = todo[:-1] if last_alone else todo
        if progress is not None:
            progress(0, todo.numel())
        if self.cache.layerwise_prefill and body.numel() > 0:
            logits = self.model.forward_layerwise(body, self.cache, self.prefill_chunk, progress)
            self.cached_ids.extend(ids[common:common + body.numel()])
            body = body[:0]
        for start in range(0, body.numel(), self.prefill_chunk):
            chunk = body[start:start + self.prefill_chunk]
            with named_range("prefill_chunk"):
                logits = self.model.forward(chunk, self.cache)
            self.cached_ids.extend(ids[common + start: common + start + chunk.numel()])
            if progress is not None:
                progress(start + chunk.numel(), todo.numel())
        if not self.cache.moves_queries(len(ids)):
            self.true_tokens = len(ids)
        if last_alone:
            with named_range("prefill_chunk"):
                logits = self.model.forward(todo[-1:], self.cache)
                while self.cache.settle_decode_step():  # it read late pages: run it again
                    logits = self.model.forward(todo[-1:], self.cache)
            self.cached_ids.append(ids[-1])
            if progress is not None:
                progress(todo.numel(), todo.numel())
        return logits[-1]

    def stream(self, prompt_ids: list[int], params: SamplingParams, stop_ids: set[int] = frozenset(),
               progress: ProgressFn | None = None) -> Iterator[int]:
        """Yield generated token ids one by one (stop tokens are not yielded)."""
        import time
        t0 = time.perf_counter()
        logits = self.prefill(prompt_ids, progress)
        sampler = Sampler(params, self.model.device, prompt_ids)
        stats = self.last_stats
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        stats.prefill_s = t1 - t0
        try:
            while True:
                token = int(sampler(logits))
                if token in stop_ids:
                    stats.finish_reason = "stop"
                    return
                stats.new_tokens += 1
                yield token
                if stats.new_tokens >= params.max_new_tokens:
                    stats.finish_reason = "length"
                    return
                if len(self.cached_ids) >= self.capacity:  # no slot left for this token's K/V
                    stats.finish_reason = "context"
                    return
                ids = torch.tensor([token], dtype=torch.long, device=self.model.device)
                with named_range("decode_step"):  # the unit `lcrun profile` splits
                    logits = self.stepper.step(ids)
                self.cached_ids.append(token)
                if not self.cache.moves_queries(len(self.cached_ids)):
                    self.true_tokens = len(self.cached_ids)
        finally:
            stats.decode_s = time.perf_counter() - t1
