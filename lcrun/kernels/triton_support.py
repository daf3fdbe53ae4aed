"""What the Triton kernels need to know about how they will run.

Triton decides at *decoration* time (when a kernel module is imported) whether ``@triton.jit``
compiles for the GPU or runs in the CPU interpreter (``TRITON_INTERPRET=1``). Kernel modules of
this package decorate through ``jit`` below, which records that mode; until one is imported, the
mode is what the environment says now. The kernel modules are imported lazily (by
``lcrun.kernels.backend``), so setting the variable any time before the first kernel use works.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, TypeVar

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
    HAVE_TRITON = True
except ImportError:  # CPU-only installs: the torch reference path still works
    triton = None
    tl = None
    HAVE_TRITON = False

    class OutOfResources(Exception):  # noqa: N818 (Triton's name)
        pass

T = TypeVar("T")
BACKENDS = ("auto", "triton", "torch")  # who runs a kernel: see use_triton
LOG2E = 1.4426950408889634  # kernels use exp2: scores are scaled by sm_scale * log2(e)

_decorated_modes: set[bool] = set()  # interpreted? for each kernel decorated so far


def is_interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def jit(fn):
    """``triton.jit`` that remembers whether the kernel was decorated for the interpreter."""
    kernel = triton.jit(fn)
    _decorated_modes.add(is_interpreted(kernel))
    return kernel


def interpreting() -> bool:
    """Whether this package's kernels run (or, not yet imported, would run) in the interpreter."""
    if not HAVE_TRITON:
        return False
    if _decorated_modes:
        return True in _decorated_modes
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether kernels must cast tl.dot operands to fp32: the interpreter computes bf16 dots wrongly."""
    return dtype == torch.bfloat16 and interpreting()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 for fp32 tensors (tests), default (ignored) for fp16/bf16."""
    return "ieee" if dtype == torch.float32 else "tf32"


def can_run_triton(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors when compiled, on CPU tensors under the interpreter."""
    if not HAVE_TRITON:
        return False
    return device.type == "cpu" if interpreting() else device.type == "cuda"


_FITTING_STAGES: dict[tuple, int] = {}


def launch_fitting_shared_memory(key: tuple, stages: int, launch: Callable[[int], T]) -> T:
    """``launch(num_stages)`` with the most software-pipeline stages, up to ``stages``, whose kernel
    fits the GPU's shared memory per block (227 KiB on an H100/H200, 99 KiB on an RTX 3090/4090:
    fp32 tiles of a 256-wide head need fewer stages than bf16 ones of a 128-wide head). Triton
    refuses a kernel that does not fit before it runs, so nothing is half done; the stages that fit
    are remembered per ``key`` (the launch's compile-time settings and its device)."""
    n = _FITTING_STAGES.get(key, stages)
    while True:
        try:
            out = launch(n)
        except OutOfResources:
            if n <= 1:
                raise
            n -= 1
            continue
        _FITTING_STAGES[key] = n
        return out


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def lazy_jit(fn):
    """A function returning ``jit(fn)``, decorated on the first call. Kernels defined this way may
    call no other Triton function (a helper would be looked up undecorated)."""
    return functools.cache(lambda: jit(fn))


def use_triton(device: torch.device, backend: str) -> bool:
    """``auto``: Triton on CUDA tensors only; on CPU, even under TRITON_INTERPRET, the torch path,
    since interpreting every norm of a model test would be slow and gains nothing. ``triton``
    forces the kernel (CPU tensors need the interpreter); ``torch`` the reference."""
    assert backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}"
    if backend == "triton" and not can_run_triton(device):
        raise RuntimeError(f"Triton kernels cannot run on {device}: use a CUDA device or TRITON_INTERPRET=1")
    return backend == "triton" or (backend == "auto" and device.type == "cuda" and can_run_triton(device))


# Programmatic dependent launch (PDL, Hopper and later): a kernel launched with it may be scheduled
# while the kernel before it in the stream is still running, so its launch and ramp-up overlap its
# predecessor's tail (measured on an H200: 0.5-1.4 us per decode layer of four to five dependent
# kernels; perf/results/attention-h200-2026-11-29-layer-32k-1m.json). The kernels that take a
# PDL flag call ``pdl_wait`` before touching memory: it waits until the predecessor has finished
# and its writes are visible, so memory order is exactly the stream's.
PDL_ENV = "LCRUN_PDL"  # "0" turns it off (read once per process and device)
_pdl_override: list[bool] = []


@functools.cache
def _pdl_default(index: int) -> bool:
    """Compute capability 9.0 or newer and not turned off by LCRUN_PDL; cached, since every kernel
    launch of an eager decode step asks."""
    if os.environ.get(PDL_ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL: CUDA compute capability 9.0 or newer, compiled
    (not interpreted), and not turned off by LCRUN_PDL=0 or ``pdl_override(False)``."""
    if device.type != "cuda" or interpreting():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if _pdl_override:
        return _pdl_override[-1] and torch.cuda.get_device_capability(index)[0] >= 9
    return _pdl_default(index)


class pdl_override:
    """``with pdl_override(False): ...`` launches without PDL (benchmarks compare both)."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        _pdl_override.append(self.on)

    def __exit__(self, *exc):
        _pdl_override.pop()


def pdl_launch(on: bool) -> dict:
    """Launch keyword arguments: {"launch_pdl": True} with PDL, nothing otherwise (the interpreter
    and older Triton do not take the argument)."""
    return {"launch_pdl": True} if on else {}


if HAVE_TRITON:
    @jit
    def pdl_wait(PDL: tl.constexpr):
        """First thing in a PDL kernel: wait for the predecessor grid (and its writes), then let the
        next PDL kernel be scheduled: it will wait here in turn, so at most two grids overlap."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @jit
    def timer_after(dep):
        """%globaltimer (ns) read by each thread once its elements of ``dep`` (int32) are computed:
        stage timestamps inside a kernel, for diagnostics (perf/diag/topk_timeline.py)."""
        return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dep], dtype=tl.int64,
                                         is_pure=False, pack=1)
