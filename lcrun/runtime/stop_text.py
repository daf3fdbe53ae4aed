"""Stop strings on streamed text: the reply ends before the first stop string, even one that spans
several tokens, and nothing after it is ever emitted."""
from __future__ import annotations


class StopText:
    """Feed text deltas in order; each push returns what is safe to show now.

    A suffix that could still grow into a stop string is held back until it either completes one
    (then it is dropped and ``stopped`` is set) or cannot any more (then it is released)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.held = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        text, self.stopped = cut_at_stop(self.held + delta, self.stops)
        if self.stopped:
            self.held = ""
            return text
        keep = _longest_prefix_suffix(text, self.stops)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """The held-back tail once the reply has ended without a stop string."""
        held, self.held = self.held, ""
        return "" if self.stopped else held


def _longest_prefix_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is the start of some stop string (shorter than it)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` before its first stop string, and whether there was one (on whole text: the
    reference the streamed result must equal)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)
