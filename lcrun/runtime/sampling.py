"""Next-token choice: penalties on repeated tokens, then greedy, or temperature with top-k / top-p
filtering, seeded."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from lcrun.config import DEFAULT_MAX_NEW_TOKENS
from lcrun.errors import ConfigError
from lcrun.ranges import named_range


@dataclass
class SamplingParams:
    """Sampling settings, checked here once for the CLI and the API alike."""
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0   # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0             # 0 = no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = ()        # the reply ends before the first of these strings
    repetition_penalty: float = 1.0   # HF/CTRL: tokens in prompt + reply, logit / p (x p if negative)
    presence_penalty: float = 0.0     # OpenAI: minus this from tokens already in the reply
    frequency_penalty: float = 0.0    # OpenAI: minus this per earlier occurrence in the reply

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be a whole number of at least 1, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"--temperature must be 0 (greedy) or more, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be above 0 and at most 1, got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"--top-k must be a whole number, 0 (off) or more, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"seed must be a whole number, got {self.seed!r}")
        self.stop = _stop_strings(self.stop)
        if not _is_number(self.repetition_penalty) or not math.isfinite(self.repetition_penalty) \
                or self.repetition_penalty <= 0:
            raise ConfigError(f"--repetition-penalty must be above 0 (1 = off), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ConfigError(f"--{name.replace('_', '-')} must be between -2 and 2 (0 = off), got {value!r}")

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "SamplingParams":
        """From keyword arguments (LLM.generate, chat, ...): unknown names are a ConfigError."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ConfigError(f"unknown sampling setting(s): {', '.join(unknown)}; known: {', '.join(names)}")
        return cls(**kwargs)


def _stop_strings(stop: Any) -> tuple[str, ...]:
    """One string or a list of them -> a tuple; each must be non-empty text."""
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ConfigError(f"stop must be a string or a list of strings, got {stop!r}")
    if any(s == "" for s in stop):
        raise ConfigError("--stop strings must not be empty")
    return tuple(stop)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Sampler:
    """Chooses each next token of one reply; remembers the reply's tokens for the penalties."""

    def __init__(self, params: SamplingParams, device: torch.device, prompt_ids: list[int] = ()):
        self.params = params
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        self.prompt_ids = list(prompt_ids)
        # With penalties: which tokens are in the prompt or reply, and how often each is in the
        # reply; made on the first call, when the vocabulary size is known.
        self.seen: torch.Tensor | None = None    # (vocab,) bool
        self.counts: torch.Tensor | None = None  # (vocab,) fp32

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: (vocab,) fp32 -> 0-dim int64 tensor on the same device."""
        with named_range("sampling"):  # a profiled decode step's "sampling" part
            if not self.params.penalised:
                return self._choose(logits)
            token = self._choose(self._penalise(logits))
            self.seen[token] = True
            self.counts[token] += 1
            return token

    def _penalise(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if self.seen is None:
            self.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            self.seen[torch.tensor(self.prompt_ids, dtype=torch.long, device=logits.device)] = True
            self.counts = torch.zeros(logits.shape[-1], dtype=torch.float32, device=logits.device)
        if p.repetition_penalty != 1.0:
            scaled = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, scaled, logits)
        return logits - self.counts * p.frequency_penalty - (self.counts > 0).float() * p.presence_penalty

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
