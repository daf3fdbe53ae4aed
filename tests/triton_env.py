"""Where the tests run Triton kernels: compiled on the GPU when there is one, else in the
interpreter on CPU tensors (conftest.py switches TRITON_INTERPRET on before lcrun is imported)."""
import pytest
import torch

from lcrun.kernels.triton_support import can_run_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HAS_TRITON = can_run_triton(DEVICE)


def require_triton() -> None:
    """Skip the calling test module when Triton kernels cannot run here."""
    if not HAS_TRITON:
        pytest.skip("Triton kernels cannot run here (no GPU, and TRITON_INTERPRET was not set before "
                    "lcrun was imported)", allow_module_level=True)
