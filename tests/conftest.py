"""Test-session setup. Triton fixes interpreter-or-GPU when a kernel is decorated, i.e. when its
module is first imported; so on a machine without CUDA the interpreter is switched on here,
before any test module imports lcrun, and every CPU test sees the same kernel mode."""
import os
import shutil
import subprocess

# One torch thread (set before torch loads; subprocesses inherit it): the suite's tensors are small,
# and at 2 threads every op pays an OpenMP hand-off that, on the shared 2-core machine under load,
# took ~60 ms (a 3x300 decode attention: 0.07 ms on one thread, 63 ms on two).
os.environ.setdefault("OMP_NUM_THREADS", "1")

if os.environ.get("TRITON_INTERPRET") is None and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"
elif os.environ.get("TRITON_INTERPRET") is None:
    try:
        has_gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        has_gpu = False
    if not has_gpu:
        os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402  (after the environment above is set)


@pytest.fixture(autouse=True)
def _fresh_gpu_allocator(request):
    """A GPU test starts with the caching allocator emptied: memory an earlier test of the same
    process left reserved counts against the next test's --gpu-mem cap (a per-process fraction),
    and made a 2 GiB-capped Gemma test run out of memory after other GPU test files."""
    if request.node.get_closest_marker("gpu") is not None:
        import gc

        import torch
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    yield
