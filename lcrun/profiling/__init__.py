"""Performance tooling: the `lcrun bench` sweep and the `lcrun profile` report.

``ranges.named_range`` marks code for the torch profiler (free when no profiler runs); ``bench``
times prefill and decode over context lengths, beside transformers; ``collect`` runs a profiled
generation and ``report`` turns it into one self-contained HTML file and its JSON.
"""
from lcrun.profiling.ranges import named_range

__all__ = ["named_range"]
