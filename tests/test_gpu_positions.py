"""GPU: the paged and tiered caches against independent paths, in both position modes, on the
demo model (real weights: peaked logits, so greedy tokens are a sharp comparison)."""
from __future__ import annotations

import pytest
import torch

from lcrun.runtime.demo import demo_model_path

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = torch.device("cuda")
TEXT = ("The lighthouse keeper wrote in his log every evening: the weather, the ships that passed, "
        "the number of gulls on the rocks and what he had for supper. ")


@pytest.fixture(scope="module")
def demo():
    path = demo_model_path()
    if path is None:
        pytest.skip("demo model not installed")
    from lcrun.runtime.build import load_model
    from lcrun.runtime.loading import open_source
    source = open_source(str(path))
    model = load_model(source, DEV, torch.float32)
    ids = source.tokenizer().encode(TEXT * 80 + "\nQuestion: what did the keeper write about? Answer:")
    return model, ids


def _tokens(model, cache, ids, n=16, graph="auto", monkeypatch=None):
    from lcrun.runtime.generate import Generator
    from lcrun.runtime.sampling import SamplingParams
    if monkeypatch is not None:
        monkeypatch.setenv("LCRUN_CUDA_GRAPH", graph)
    out = list(Generator(model, cache, prefill_chunk=512).stream(ids, SamplingParams(max_new_tokens=n)))
    if hasattr(cache, "close"):
        cache.close()
    return out


def _paged(model, capacity, rule, budget):
    from lcrun.runtime.paged_cache import PagedTopKCache
    return PagedTopKCache(model.cfg, capacity, DEV, torch.float32, page_size=32, budget=budget, sink_tokens=64,
                          window_tokens=512, chunk_pages="auto", positions=rule)


def _tiered(model, capacity, rule, budget, **kw):
    from lcrun.runtime.tiered import TieredTopKCache
    return TieredTopKCache(model.cfg, capacity, DEV, torch.float32, cache_slots_per_layer=96, page_size=32,
                           budget=budget, sink_tokens=64, window_tokens=512, prefetch="off", positions=rule, **kw)


def test_true_positions_tiered_equals_paged_equals_dense(demo):
    from lcrun.runtime.kv_cache import DenseCache
    from lcrun.runtime.positions import PositionRule
    model, ids = demo
    cap = len(ids) + 64
    dense = _tokens(model, DenseCache(model.cfg, cap, DEV, torch.float32), ids)
    for rule in (PositionRule(None), PositionRule(8192)):  # never moves / may move, but inside the window
        assert _tokens(model, _paged(model, cap, rule, budget=cap), ids) == dense
        assert _tokens(model, _tiered(model, cap, rule, budget=cap), ids) == dense


def test_window_positions_tiered_equals_paged_equals_torch_reference(demo):
    from lcrun.runtime.positions import PositionRule
    from lcrun.runtime.window_cache import WindowTopKCache
    model, ids = demo
    cap = len(ids) + 64
    ref = _tokens(model, WindowTopKCache(model.cfg, cap, DEV, torch.float32, page_size=32, budget=cap,
                                         sink_tokens=64, window_tokens=512), ids)
    assert _tokens(model, _paged(model, cap, PositionRule(0), budget=cap), ids) == ref
    assert _tokens(model, _tiered(model, cap, PositionRule(0), budget=cap), ids) == ref


def test_crossing_the_window_graph_equals_eager_and_tiered_equals_paged(demo, monkeypatch):
    """A small budget (selection live) and a trained window passed during decode: the captured
    steps (recaptured when the step moves to window positions) match eager steps."""
    from lcrun.runtime.positions import PositionRule
    model, ids = demo
    cap, rule = len(ids) + 64, PositionRule(len(ids) + 8)
    eager = _tokens(model, _paged(model, cap, rule, budget=1024), ids, 24, "0", monkeypatch)
    assert _tokens(model, _paged(model, cap, rule, budget=1024), ids, 24, "auto", monkeypatch) == eager
    assert _tokens(model, _tiered(model, cap, rule, budget=1024), ids, 24, "auto", monkeypatch) == eager


def test_nvme_in_the_loop_equals_no_nvme(demo, tmp_path, monkeypatch):
    from lcrun.runtime.positions import PositionRule
    model, ids = demo
    cap, rule = len(ids) + 64, PositionRule(2048)
    host = _tokens(model, _tiered(model, cap, rule, budget=1024), ids, 24, "auto", monkeypatch)
    cache = _tiered(model, cap, rule, budget=1024, host_slots_per_layer=3 * 40, kv_dir=str(tmp_path))
    assert cache.spills
    assert _tokens(model, cache, ids, 24, "auto", monkeypatch) == host
