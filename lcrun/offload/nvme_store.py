"""The disk tier of the KV cache: fixed-size page slots in one preallocated file under --kv-dir.

Layout: a private folder ``<kv_dir>/lcrun-kv-<pid>-<random>`` (mode 0700: KV pages are the user's
prompt in another form) holds ``slots.bin``, where slot i lives at byte i * slot_bytes.

I/O: the file is opened with O_DIRECT when the filesystem accepts it (probed at start with one
aligned write and read; EINVAL means no, and ``direct_io`` says which), so spilled pages do not
also fill the page cache that the host pool competes with. O_DIRECT needs 4096-aligned addresses
and sizes: slots are multiples of 4096 and HostPagePool slots are aligned; other buffers go
through an aligned bounce buffer. Runs of consecutive slots become one ``pwritev``/``preadv``;
the runs of a batch are dealt out to up to ``io_threads`` threads (the calls release the GIL), so
random page reads -- one call per page -- keep that many requests in flight: a consumer NVMe drive
reads 16 KiB pages at ~0.08 GB/s one at a time and several GB/s with dozens in flight. The default
is ``DEFAULT_IO_THREADS``, or ``LCRUN_NVME_IO_THREADS``.

Cleanup: :meth:`NvmeStore.close`, or a ``weakref.finalize`` that runs when the store is dropped
and at interpreter exit (atexit), removes the folder. Ctrl-C raises KeyboardInterrupt, which
unwinds to that exit. SIGTERM and SIGHUP by default kill Python without running any exit code:
an application that wants the folder removed then too calls
:func:`lcrun.exit_signals.exit_cleanly_on_signals` (the `lcrun` command does; the library installs
no handler). SIGKILL cannot be caught: a process killed that way leaves its folder behind.
"""
from __future__ import annotations

import errno
import math
import mmap
import os
import queue
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, wait
from pathlib import Path

import numpy as np
import torch

from lcrun.errors import CapacityError, LcrunError
from lcrun.units import env_number, format_bytes

ALIGN = 4096
FOLDER_PREFIX = "lcrun-kv-"
DATA_FILE = "slots.bin"
# One task moves between these many bytes: smaller is not worth a thread hop, larger would leave
# threads idle on a batch that could be split.
_MIN_TASK_BYTES = 256 << 10
_MAX_TASK_BYTES = 8 << 20
# Requests in flight: each I/O thread has one system call outstanding (os.preadv is synchronous).
DEFAULT_IO_THREADS = 16
IO_THREADS_ENV = "LCRUN_NVME_IO_THREADS"
try:
    _IOV_MAX = max(1, min(os.sysconf("SC_IOV_MAX"), 1024))
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 16
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def default_io_threads() -> int:
    """``LCRUN_NVME_IO_THREADS`` when set (a positive integer), else DEFAULT_IO_THREADS."""
    return int(env_number(IO_THREADS_ENV, DEFAULT_IO_THREADS, minimum=1))


def _transfer(fn, fd: int, views: list[memoryview], offset: int) -> None:
    """``os.pwritev``/``os.preadv`` until every byte moved (a call may move fewer)."""
    while views:
        n = fn(fd, views, offset)
        if n == 0:
            raise OSError(errno.EIO, "unexpected end of the KV page file")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]


class _Disk:
    """What the I/O threads and the finalizer use, apart from NvmeStore so that neither keeps the
    store alive (the finalizer then runs in the thread that dropped the last reference)."""

    def __init__(self, path: Path, slot_bytes: int):
        self.path, self.slot_bytes = path, slot_bytes
        self.owner_pid = os.getpid()
        self.fd = -1
        self.direct_io = False
        self.threads: list[threading.Thread] = []
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.closed = False
        self.bytes_written = self.bytes_read = 0
        self.read_seconds = self.write_seconds = 0.0
        self._local = threading.local()

    def open(self, nbytes: int, use_direct_io: bool) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        file = self.path / DATA_FILE
        direct = getattr(os, "O_DIRECT", 0) if use_direct_io else 0
        if direct:
            try:
                self.fd = os.open(file, flags | direct, 0o600)
                self.direct_io = True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        if self.fd < 0:
            self.fd = os.open(file, flags, 0o600)
        self._preallocate(nbytes)
        if self.direct_io and not self._direct_io_works():
            os.close(self.fd)
            self.fd, self.direct_io = os.open(file, os.O_RDWR | getattr(os, "O_CLOEXEC", 0)), False

    def _preallocate(self, nbytes: int) -> None:
        # Reserving the blocks now makes a too-small disk fail at start rather than mid-generation.
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(self.fd, 0, nbytes)
                return
            except OSError as e:
                if e.errno in _DISK_FULL:
                    raise
        os.ftruncate(self.fd, nbytes)  # no fallocate here: a sparse file, ENOSPC shows on writes

    def _direct_io_works(self) -> bool:
        # Some filesystems accept O_DIRECT in open() and refuse the I/O itself.
        buf = memoryview(self._bounce(ALIGN))
        try:
            os.preadv(self.fd, [buf], 0)
            os.pwritev(self.fd, [buf], 0)
            return True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            return False

    def _bounce(self, nbytes: int) -> mmap.mmap:
        """A per-thread page-aligned buffer (anonymous mmap) of at least ``nbytes``."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            buf = self._local.buf = mmap.mmap(-1, nbytes)
        return buf

    def run_task(self, write: bool, task: list[tuple[int, list[np.ndarray]]]) -> None:
        """Move one task: a list of (first slot, row buffers of consecutive slots)."""
        fn = os.pwritev if write else os.preadv
        sb = self.slot_bytes
        for first, rows in task:
            offset = first * sb
            if self.direct_io and any(r.ctypes.data % ALIGN for r in rows):
                bounce = np.frombuffer(self._bounce(len(rows) * sb), np.uint8)[: len(rows) * sb]
                if write:
                    for i, r in enumerate(rows):
                        bounce[i * sb:(i + 1) * sb] = r
                _transfer(fn, self.fd, [memoryview(bounce)], offset)
                if not write:
                    for i, r in enumerate(rows):
                        r[:] = bounce[i * sb:(i + 1) * sb]
            else:
                _transfer(fn, self.fd, [memoryview(r) for r in rows], offset)

    # I/O threads: daemon threads on a queue rather than a ThreadPoolExecutor. A KeyboardInterrupt
    # or SystemExit that lands inside ThreadPoolExecutor.submit while it starts a thread leaves that
    # thread unknown to the executor's exit hook, and the interpreter then hangs at exit joining it
    # (before any atexit cleanup runs). Daemon threads never block exit; cleanup drains and joins them.

    def start_threads(self, n: int) -> None:
        for i in range(n):
            t = threading.Thread(target=self._work, name=f"lcrun-kv-io-{i}", daemon=True)
            self.threads.append(t)  # listed before start, so cleanup knows it even if start is interrupted
            t.start()

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            future, write, task = item
            try:
                self.run_task(write, task)
            except BaseException as e:
                future.set_exception(e)
            else:
                future.set_result(None)

    def submit(self, write: bool, tasks: list, on_done=None) -> list[Future]:
        """Queue tasks; ``on_done`` is attached before queuing, so it always runs on an I/O thread."""
        futures = [Future() for _ in tasks]
        for f in futures:
            f.set_running_or_notify_cancel()
            if on_done is not None:
                f.add_done_callback(on_done)
        for f, task in zip(futures, tasks):
            self.queue.put((f, write, task))
        return futures

    def cleanup(self) -> None:
        """Finish queued I/O, close the file, remove the folder; idempotent."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
        if os.getpid() != self.owner_pid:
            return  # a forked child inherited the finalizer: the folder is the parent's
        if threading.current_thread() in self.threads:
            # close() from an I/O thread (a future's callback): it cannot wait for itself, so let
            # another thread wait for the I/O threads before the fd is closed (never close an fd in use).
            threading.Thread(target=self._finish).start()
        else:
            self._finish()

    def _finish(self) -> None:
        for _ in self.threads:
            self.queue.put(None)  # after every queued task: those still run
        for t in self.threads:
            if t.ident is not None and t is not threading.current_thread():
                t.join()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        shutil.rmtree(self.path, ignore_errors=True)


class NvmeStore:
    """``num_slots`` slots of ``slot_bytes`` bytes on disk, in a private folder under ``kv_dir``.

    ``write`` blocks; ``read_into`` returns a Future done by the I/O threads. Buffers are uint8 CPU
    tensors: a ``(n, slot_bytes)`` tensor whose rows are contiguous, or a sequence of n 1-D tensors
    of ``slot_bytes`` each (e.g. scattered HostPagePool slots). Within one ``write`` the last
    occurrence of a repeated slot wins.
    """

    def __init__(self, kv_dir: str | os.PathLike, slot_bytes: int, num_slots: int, io_threads: int | None = None,
                 use_direct_io: bool = True):
        if io_threads is None:
            io_threads = default_io_threads()
        if slot_bytes <= 0 or slot_bytes % ALIGN:
            raise ValueError(f"slot_bytes must be a positive multiple of {ALIGN}, got {slot_bytes}")
        if num_slots <= 0 or io_threads <= 0:
            raise ValueError(f"num_slots and io_threads must be positive, got {num_slots}, {io_threads}")
        self.kv_dir = Path(kv_dir).expanduser().absolute()
        self.slot_bytes, self.num_slots, self.io_threads = int(slot_bytes), int(num_slots), int(io_threads)
        self.nbytes = self.slot_bytes * self.num_slots
        try:
            self.kv_dir.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.kv_dir).free
        except OSError as e:
            raise LcrunError(f"cannot use --kv-dir {self.kv_dir} ({e.strerror or e}): pick a writable folder") from e
        if self.nbytes > free:
            raise CapacityError(
                f"spilling KV pages needs {format_bytes(self.nbytes)} in --kv-dir {self.kv_dir} but only "
                f"{format_bytes(free)} is free: point --kv-dir at a disk with more space, raise --host-mem "
                f"so fewer pages spill, or lower --ctx")
        try:  # mkdtemp: mode 0700 and a random name nobody else can pre-create
            path = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=self.kv_dir))
        except OSError as e:
            raise LcrunError(f"cannot create a folder in --kv-dir {self.kv_dir} ({e.strerror or e}): "
                             f"pick a writable folder") from e
        self.path = path
        self._disk = _Disk(path, self.slot_bytes)
        # Registered before anything can fail, so every exit path below removes the folder.
        self._finalizer = weakref.finalize(self, self._disk.cleanup)
        try:
            self._disk.open(self.nbytes, use_direct_io)
        except OSError as e:
            self.close()
            if e.errno in _DISK_FULL:
                raise CapacityError(self._disk_full_message("reserving")) from e
            raise LcrunError(f"cannot create the KV page file in {path} ({e.strerror or e})") from e
        self._disk.start_threads(self.io_threads)

    # --- public API -------------------------------------------------------------------------

    def write(self, slot_ids: Sequence[int], src: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Write row i of ``src`` to slot ``slot_ids[i]``; returns when all bytes are in the file."""
        ids, rows = self._check(slot_ids, src)
        last = {s: r for s, r in zip(ids, rows)}  # a repeated slot: the last row wins
        tasks = self._plan(list(last.items()))
        t0 = time.perf_counter()
        try:
            if len(tasks) == 1:  # not worth a thread hop
                self._disk.run_task(True, tasks[0])
            else:
                futures = self._disk.submit(True, tasks)
                wait(futures)
                for f in futures:
                    f.result()
        except OSError as e:
            if e.errno in _DISK_FULL:
                self.close()
                raise CapacityError(self._disk_full_message("spilling")) from e
            raise LcrunError(f"writing KV pages to {self.path} failed ({e.strerror or e})") from e
        with self._disk.lock:
            self._disk.bytes_written += len(last) * self.slot_bytes
            self._disk.write_seconds += time.perf_counter() - t0

    def read_into(self, slot_ids: Sequence[int], dst: torch.Tensor | Sequence[torch.Tensor]) -> Future:
        """Start reading slot ``slot_ids[i]`` into row i of ``dst``; the Future's result is ``dst``."""
        ids, rows = self._check(slot_ids, dst)
        disk, t0, nbytes = self._disk, time.perf_counter(), len(ids) * self.slot_bytes
        out: Future = Future()
        out.set_running_or_notify_cancel()
        tasks = self._plan(list(zip(ids, rows)))
        if not tasks:
            out.set_result(dst)
            return out
        pending, errors = [len(tasks)], []

        def on_done(f: Future) -> None:
            with disk.lock:
                if f.exception() is not None:
                    errors.append(f.exception())
                pending[0] -= 1
                if pending[0]:
                    return
                disk.read_seconds += time.perf_counter() - t0
                if not errors:
                    disk.bytes_read += nbytes
            if not errors:
                out.set_result(dst)
            elif isinstance(errors[0], OSError):
                why = errors[0].strerror or errors[0]
                out.set_exception(LcrunError(f"reading KV pages from {disk.path} failed ({why})"))
            else:
                out.set_exception(errors[0])

        disk.submit(False, tasks, on_done)
        return out

    def read_into_sync(self, slot_ids: Sequence[int], dst: torch.Tensor | Sequence[torch.Tensor]):
        return self.read_into(slot_ids, dst).result()

    @property
    def direct_io(self) -> bool:
        return self._disk.direct_io

    @property
    def bytes_written(self) -> int:
        return self._disk.bytes_written

    @property
    def bytes_read(self) -> int:
        return self._disk.bytes_read

    @property
    def read_seconds(self) -> float:
        """Wall time from each read_into call to its completion, summed over calls."""
        return self._disk.read_seconds

    @property
    def write_seconds(self) -> float:
        return self._disk.write_seconds

    @property
    def closed(self) -> bool:
        return self._disk.closed

    def close(self) -> None:
        """Wait for queued I/O, close the file and remove the private folder; idempotent."""
        self._finalizer()

    def __enter__(self) -> NvmeStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"NvmeStore({self.path}, {self.num_slots} x {format_bytes(self.slot_bytes)}, "
                f"direct_io={self.direct_io}{', closed' if self.closed else ''})")

    # --- helpers ----------------------------------------------------------------------------

    def _disk_full_message(self, doing: str) -> str:
        return (f"disk full while {doing} KV pages to {self.kv_dir} (the spill folder was removed): free space "
                f"there, point --kv-dir at a larger disk, raise --host-mem or lower --ctx")

    def _check(self, slot_ids, data) -> tuple[list[int], list[np.ndarray]]:
        """Validate ids and buffers; rows as numpy arrays sharing the tensors' memory."""
        if self.closed:
            raise LcrunError(f"the KV page store {self.path} is closed")
        ids = [int(s) for s in slot_ids]
        bad = [s for s in ids if not 0 <= s < self.num_slots]
        if bad:
            raise IndexError(f"slot ids {bad[:5]} out of range [0, {self.num_slots})")
        tensors = [data] if isinstance(data, torch.Tensor) else list(data)
        for t in tensors:
            if t.dtype != torch.uint8 or t.device.type != "cpu":
                raise TypeError(f"KV page buffers must be uint8 CPU tensors, got {t.dtype} on {t.device}")
        if isinstance(data, torch.Tensor):
            if data.dim() != 2 or tuple(data.shape) != (len(ids), self.slot_bytes) or data.stride(1) != 1:
                raise ValueError(f"expected a ({len(ids)}, {self.slot_bytes}) tensor with contiguous rows, "
                                 f"got shape {tuple(data.shape)} strides {data.stride()}")
            arr = data.numpy()
            rows = [arr[i] for i in range(len(ids))]
        else:
            if len(tensors) != len(ids) or any(t.numel() != self.slot_bytes or not t.is_contiguous() for t in tensors):
                raise ValueError(f"expected {len(ids)} contiguous tensors of {self.slot_bytes} bytes")
            rows = [t.reshape(-1).numpy() for t in tensors]
        return ids, rows

    def _plan(self, pairs: list[tuple[int, np.ndarray]]) -> list[list[tuple[int, list[np.ndarray]]]]:
        """Sort by slot, coalesce consecutive slots into runs, deal the runs out to tasks.

        Runs, not bytes, set the parallelism: each run is one system call, and scattered pages (the
        promoter's reads) are one run each, so they go to up to ``io_threads`` tasks of about equal
        size however small the batch. A long run is cut so that every thread gets a share of a big
        sequential batch, but not below _MIN_TASK_BYTES (not worth a thread hop)."""
        if not pairs:
            return []
        sb, n = self.slot_bytes, len(pairs)
        run_cap = max(math.ceil(n / self.io_threads), _MIN_TASK_BYTES // sb, 1)
        run_cap = min(run_cap, max(1, _MAX_TASK_BYTES // sb), _IOV_MAX)
        runs: list[tuple[int, list[np.ndarray]]] = []
        for slot, row in sorted(pairs, key=lambda p: p[0]):
            if runs and slot == runs[-1][0] + len(runs[-1][1]) and len(runs[-1][1]) < run_cap:
                runs[-1][1].append(row)
            else:
                runs.append((slot, [row]))
        n_tasks = min(self.io_threads, len(runs))
        tasks: list[list[tuple[int, list[np.ndarray]]]] = []
        task: list[tuple[int, list[np.ndarray]]] = []
        done = 0
        for run in runs:  # consecutive runs per task, closed at each 1/n_tasks of the slots
            task.append(run)
            done += len(run[1])
            if done * n_tasks >= (len(tasks) + 1) * n:
                tasks.append(task)
                task = []
        if task:
            tasks.append(task)
        return tasks
