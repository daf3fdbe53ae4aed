"""Named ranges for the torch profiler, around the parts of a decode step the report splits.

The runtime calls ``named_range`` in its hot loop (every layer of every step), so with no
profiler active it must cost nothing but a flag check: it hands back one shared no-op context
manager. Under a profiler it is ``torch.profiler.record_function``, which the trace shows as a
named span and ``lcrun.profiling.attribution`` uses to attribute kernel time.

Range names the report knows (others still appear, under their own name):
    score, topk, attend, kv_write, attention, dense, lm_head, sampling, wait, prefetch, admit,
    fetch.<tier> (fetch.host, fetch.nvme, ...), and decode_step / prefill_chunk around whole steps.
"""
from __future__ import annotations

import contextlib

import torch

_NOOP = contextlib.nullcontext()
_profiler_enabled = torch.autograd._profiler_enabled  # a C call: no Python-level profiler lookup


def named_range(name: str):
    """``with named_range("score"): ...``: a profiler range when profiling, else a no-op."""
    if _profiler_enabled():
        return torch.profiler.record_function(name)
    return _NOOP
