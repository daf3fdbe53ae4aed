"""launch_fitting_shared_memory: a kernel that does not fit the GPU's shared memory with the
pipeline stages asked for is launched with fewer (Triton refuses it before it runs), and the
number that fits is remembered per launch key. The GPU side: tests/test_gemma_gpu.py (fp32
pools of 256-wide heads on an H200) and any 99 KiB consumer card."""
from __future__ import annotations

import pytest

from lcrun.kernels import triton_support as ts


def _launcher(fits: int, calls: list[int]):
    def launch(stages: int) -> str:
        calls.append(stages)
        if stages > fits:
            raise ts.OutOfResources(stages * 100_000, fits * 100_000, "shared memory")
        return f"ran with {stages}"
    return launch


def test_fewer_stages_when_the_kernel_does_not_fit_and_remembered():
    calls: list[int] = []
    key = ("test-kernel", "fits-one")
    assert ts.launch_fitting_shared_memory(key, 3, _launcher(1, calls)) == "ran with 1"
    assert calls == [3, 2, 1]
    calls.clear()
    assert ts.launch_fitting_shared_memory(key, 3, _launcher(1, calls)) == "ran with 1"
    assert calls == [1]  # no second round of refusals


def test_a_kernel_that_fits_keeps_its_stages_and_one_that_never_fits_raises():
    calls: list[int] = []
    assert ts.launch_fitting_shared_memory(("test-kernel", "fits-all"), 2, _launcher(4, calls)) == "ran with 2"
    assert calls == [2]
    with pytest.raises(ts.OutOfResources):
        ts.launch_fitting_shared_memory(("test-kernel", "fits-none"), 2, _launcher(0, []))
