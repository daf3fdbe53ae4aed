"""GPU checks (run on the device: `pytest -m gpu`); skipped where there is no CUDA GPU."""
from __future__ import annotations

import pytest
import torch

from lcrun.runtime.demo import demo_model_path

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def demo():
    path = demo_model_path()
    if path is None:
        pytest.skip("demo model not installed")
    return str(path)


def _greedy(model: str, device: str, dtype: str, n: int, **settings) -> list[int]:
    from lcrun import LLM
    llm = LLM(model, ctx="4k", device=device, dtype=dtype, progress=False, **settings)
    msgs = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    return list(llm.stream_ids(llm.encode_chat(msgs), max_new_tokens=n))


def test_demo_greedy_tokens_same_on_gpu_and_cpu(demo):
    cpu = _greedy(demo, "cpu", "float32", 64)
    gpu = _greedy(demo, "cuda", "float32", 64)
    assert gpu == cpu


def test_gpu_mem_cap_is_enforced():
    from lcrun import LLM
    from lcrun.errors import CapacityError
    with pytest.raises(CapacityError, match="--gpu-mem"):
        LLM("synthetic:llama-3.2-1b", ctx="1M", gpu_mem="4GiB", progress=False)


@pytest.mark.parametrize("attention", ["dense", "topk"])
def test_graph_replayed_decode_matches_eager(attention, monkeypatch):
    """The captured decode step (DecodeStepper) gives the tokens of eager steps, for the dense
    cache and the on-GPU paged top-k cache (context past the budget, so selection is live)."""
    from lcrun import LLM

    def run(graph: str) -> list[int]:
        monkeypatch.setenv("LCRUN_CUDA_GRAPH", graph)
        llm = LLM("synthetic:llama-3.2-1b", ctx="8k", attention=attention, budget=512, sink_tokens=32, window_tokens=128, dtype="float32",
                  progress=False)
        assert llm.generator.stepper.use_graph == (graph != "0")
        prompt = torch.randint(0, llm.model_config.vocab_size, (3000,), generator=torch.Generator().manual_seed(0))
        return list(llm.stream_ids(prompt.tolist(), max_new_tokens=24))

    assert run("auto") == run("0")
