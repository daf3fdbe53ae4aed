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
