"""Quantized weights on the GPU (run on the device: `pytest -m gpu tests/test_gpu_quant.py`):
kernels at real 8B shapes against gguf's dequantizer, the demo model from its blocks against the
CPU's dense path, and the 8B synthetic model in Q4_0 under a 24 GiB cap."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lcrun.kernels.quant.formats import FORMATS
from lcrun.kernels.quant.weight import QuantWeight
from tests.test_quant_kernels import gguf_blocks, reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336)])
def test_kernels_at_8b_shapes_match_gguf(fmt, n, k):
    from lcrun.kernels.quant.kernels import dequantize, qgemv
    raw = gguf_blocks(fmt, n, k, seed=n)
    ref = reference(fmt, raw, n, k).cuda()
    w = QuantWeight.from_gguf(fmt, raw, n, k).to(torch.device("cuda"))
    x = torch.randn(1, k, device="cuda")
    expected = x.double() @ ref.double().T
    got = qgemv(x, w).double()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    xb = x.to(torch.bfloat16)
    got_bf16 = qgemv(xb, w).double()
    assert ((got_bf16 - xb.double() @ ref.double().T).norm() / expected.norm()).item() < 1e-2
    assert torch.equal(dequantize(w, torch.float32), ref)


def test_demo_blocks_on_gpu_match_cpu_dense():
    from lcrun.runtime.build import load_model
    from lcrun.runtime.demo import demo_model_path
    from lcrun.runtime.kv_cache import DenseCache
    from lcrun.runtime.loader_gguf import GGUFSource
    path = demo_model_path()
    if path is None:
        pytest.skip("demo model not installed")
    source = GGUFSource(path)
    ids = torch.tensor(np.random.default_rng(0).integers(0, source.config.vocab_size, 40))
    out = {}
    for name, device, weights, fmt in (("gpu_blocks", "cuda", "auto", "Q4_1"), ("cpu_dense", "cpu", "bf16", "float32")):
        model = load_model(source, torch.device(device), torch.float32, weights=weights)
        assert model.weight_format() == fmt
        cache = DenseCache(model.cfg, 64, device, torch.float32)
        d = torch.device(device)
        out[name] = torch.cat([model.forward(ids[:-1].to(d), cache, all_logits=True),
                               model.forward(ids[-1:].to(d), cache, all_logits=True)]).cpu()
    err = (out["gpu_blocks"] - out["cpu_dense"]).norm() / out["cpu_dense"].norm()
    assert err.item() <= 1e-3


def test_8b_q4_0_runs_under_24gib_with_all_kv_on_gpu():
    from lcrun import LLM
    llm = LLM("synthetic:llama-3.1-8b", ctx="128k", weights="q4_0", gpu_mem="24GiB", progress=False)
    assert llm.model.weight_format() == "Q4_0" and llm.model.weight_bytes() < 4.5 * 2**30
    assert llm.plan.all_on_gpu
    ids = list(llm.stream_ids(list(range(1, 300)), max_new_tokens=4))
    assert len(ids) == 4
