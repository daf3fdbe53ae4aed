"""The host tier of the KV cache: one page-aligned, pinned buffer of fixed-size slots, made once.

The GPU reads these slots in place (zero-copy through UVA), so the memory must be page-locked and
must never move: it is one anonymous ``mmap`` (page-aligned by construction) registered with
``cudaHostRegister``. Without CUDA the same code runs on plain memory and reports ``pinned=False``.
"""
from __future__ import annotations

import math
import mmap
import threading

import psutil
import torch

from lcrun.errors import CapacityError
from lcrun.units import format_bytes

ALIGN = 4096

# Bytes of host pools alive now (pinned, or plain on a machine without CUDA), keyed by pool id.
_registry: dict[int, int] = {}
_registry_lock = threading.Lock()


def pinned_bytes_in_use() -> int:
    """Bytes held by host pools that are not closed yet (tests assert it is 0 after close)."""
    with _registry_lock:
        return sum(_registry.values())


class HostPagePool:
    """``num_slots`` slots of ``slot_bytes`` each in one allocation; slot i starts at i * slot_bytes.

    ``pin=None`` pins when CUDA is available. After :meth:`close` the memory is unpinned; views
    handed out earlier stay valid plain memory (it is unmapped only when the last view is gone),
    but the GPU must no longer read them.
    """

    def __init__(self, num_slots: int, slot_bytes: int, pin: bool | None = None):
        assert slot_bytes > 0 and slot_bytes % ALIGN == 0, f"slot_bytes must be a multiple of {ALIGN}, got {slot_bytes}"
        assert num_slots > 0, f"num_slots must be positive, got {num_slots}"
        self.num_slots, self.slot_bytes = int(num_slots), int(slot_bytes)
        self.nbytes = self.num_slots * self.slot_bytes
        available = psutil.virtual_memory().available
        if self.nbytes > available:
            raise CapacityError(
                f"the host KV pool needs {format_bytes(self.nbytes)} but only {format_bytes(available)} of RAM "
                f"is available: lower --host-mem (pages that do not fit spill to --kv-dir)")
        self.pinned = False
        self._closed = False
        # Anonymous mmap: page-aligned, and munmapped only when the last tensor view drops it
        # (torch.frombuffer keeps a reference to the mmap object), so close() cannot free memory
        # that a view still points at.
        self._bytes = torch.frombuffer(mmap.mmap(-1, self.nbytes), dtype=torch.uint8)
        assert self._bytes.data_ptr() % ALIGN == 0
        if torch.cuda.is_available() if pin is None else pin:
            cudart = torch.cuda.cudart()
            rc = int(cudart.cudaHostRegister(self._bytes.data_ptr(), self.nbytes, 0))
            if rc != 0:
                self._bytes = None
                raise CapacityError(
                    f"pinning {format_bytes(self.nbytes)} of host memory for KV pages failed (cudaError {rc}): "
                    f"lower --host-mem")
            self.pinned = True
        with _registry_lock:
            _registry[id(self)] = self.nbytes

    def data_ptr(self) -> int:
        self._check_open()
        return self._bytes.data_ptr()

    def slots_view(self, dtype: torch.dtype, shape_per_slot: tuple[int, ...] | list[int]) -> torch.Tensor:
        """A ``(num_slots, *shape_per_slot)`` tensor of ``dtype`` over the slots, sharing memory.

        The shape may use less than a slot (the tail of each slot is then padding).
        """
        self._check_open()
        shape = tuple(int(s) for s in shape_per_slot)
        used = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if used > self.slot_bytes:
            raise ValueError(f"{shape} of {dtype} needs {used} bytes, more than a slot ({self.slot_bytes})")
        rows = self._bytes.view(self.num_slots, self.slot_bytes)[:, :used]
        return rows.view(dtype).unflatten(1, shape) if shape else rows.view(dtype).squeeze(1)

    def close(self) -> None:
        """Unpin and release the accounting; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.pinned:
            # Unregistering while a kernel or copy still reads the slots would fault on the GPU.
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaHostUnregister(self._bytes.data_ptr())
            self.pinned = False
        self._bytes = None
        with _registry_lock:
            _registry.pop(id(self), None)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("HostPagePool is closed")

    def __enter__(self) -> HostPagePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # Safety net only: close() is the contract. Guarded because __del__ can run half-built
        # (constructor raised) or during interpreter shutdown.
        try:
            if hasattr(self, "_closed"):
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"HostPagePool({self.num_slots} x {format_bytes(self.slot_bytes)} = {format_bytes(self.nbytes)}, "
                f"pinned={self.pinned}{', closed' if self._closed else ''})")
