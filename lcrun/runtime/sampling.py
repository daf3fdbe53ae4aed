"""Next-token choice: greedy, or temperature with top-k / top-p filtering, seeded."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lcrun.profiling.ranges import named_range


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0   # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0             # 0 = no top-k filter
    seed: int | None = None


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: (vocab,) fp32 -> 0-dim int64 tensor on the same device."""
        with named_range("sampling"):  # a profiled decode step's "sampling" part
            return self._choose(logits)

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.temperature <= 0:
            return logits.argmax(-1)
        logits = logits / p.temperature
        if p.top_k > 0:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, -1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop = sorted_probs.cumsum(-1) - sorted_probs > p.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=self.generator)[0]
