"""Performance tooling: the `lcrun bench` sweep and the `lcrun profile` report.

The runtime marks code for the torch profiler with ``lcrun.ranges.named_range``; ``bench`` times
prefill and decode over context lengths, beside transformers; ``collect`` runs a profiled
generation and ``report`` turns it into one self-contained HTML file and its JSON.
"""
