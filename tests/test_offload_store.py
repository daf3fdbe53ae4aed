"""HostPagePool and NvmeStore on the CPU: bit-exact round trips against a dict model, capacity and
disk-full errors, the private folder's mode and its removal on close, exit, SIGTERM and SIGINT."""
import errno
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lcrun.errors import CapacityError, LcrunError
from lcrun.offload import HostPagePool, NvmeStore, pinned_bytes_in_use
from lcrun.offload import nvme_store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """exit_cleanly_on_signals converts default SIGTERM/SIGHUP into SystemExit: keep that out of other tests."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def leftovers(kv_dir) -> list[str]:
    return [p.name for p in Path(kv_dir).glob(nvme_store.FOLDER_PREFIX + "*")]


def pattern(slot: int, version: int, slot_bytes: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(slot * 1000 + version)
    return torch.randint(0, 256, (slot_bytes,), dtype=torch.uint8, generator=g)


# --- HostPagePool -------------------------------------------------------------------------------

def test_pool_alignment_views_and_accounting():
    base = pinned_bytes_in_use()
    with HostPagePool(8, 16384) as pool:
        assert pool.data_ptr() % 4096 == 0
        assert (pool.num_slots, pool.slot_bytes, pool.nbytes) == (8, 16384, 8 * 16384)
        assert pool.pinned is torch.cuda.is_available()
        assert pinned_bytes_in_use() == base + pool.nbytes
        raw = pool.slots_view(torch.uint8, (16384,))
        kv = pool.slots_view(torch.float16, (2, 32, 128))  # K and V page of P=32, D=128
        assert kv.shape == (8, 2, 32, 128) and raw.shape == (8, 16384)
        assert raw.data_ptr() == kv.data_ptr() == pool.data_ptr()
        kv[3, 1, 5, 7] = 1.5
        off = 3 * 16384 + (1 * 32 * 128 + 5 * 128 + 7) * 2
        assert raw.view(-1)[off:off + 2].view(torch.float16).item() == 1.5
        part = pool.slots_view(torch.float16, (2, 16, 64))  # a smaller page: rest of the slot unused
        assert part.shape == (8, 2, 16, 64) and part[1].data_ptr() == pool.data_ptr() + 16384
        with pytest.raises(ValueError):
            pool.slots_view(torch.float32, (2, 32, 128))
    assert pinned_bytes_in_use() == base
    pool.close()  # idempotent
    with pytest.raises(RuntimeError):
        pool.data_ptr()
    with pytest.raises(AssertionError):
        HostPagePool(4, 1000)


def test_pool_views_outlive_close():
    pool = HostPagePool(2, 4096)
    v = pool.slots_view(torch.uint8, (4096,))
    pool.close()
    v.fill_(7)  # still mapped: freed only when the last view goes
    assert int(v.sum()) == 7 * 8192


def test_pool_refuses_more_than_available_ram():
    avail = psutil.virtual_memory().available
    slots = avail // 2**30 + 2
    with pytest.raises(CapacityError) as e:
        HostPagePool(slots, 2**30)
    msg = str(e.value)
    assert "--host-mem" in msg and f"{slots * 1.0:.2f} GiB" in msg and "available" in msg


def test_pool_pinning_path_with_fake_cudart(monkeypatch):
    calls = []

    class FakeCudart:
        rc = 0

        def cudaHostRegister(self, ptr, size, flags):
            calls.append(("reg", ptr, size, flags))
            return self.rc

        def cudaHostUnregister(self, ptr):
            calls.append(("unreg", ptr))
            return 0

    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    base = pinned_bytes_in_use()
    pool = HostPagePool(4, 4096, pin=True)
    assert pool.pinned and calls == [("reg", pool.data_ptr(), 4 * 4096, 0)]
    ptr = pool.data_ptr()
    pool.close()
    pool.close()
    assert calls[1:] == [("unreg", ptr)] and not pool.pinned and pinned_bytes_in_use() == base
    fake.rc = 2  # cudaErrorMemoryAllocation
    with pytest.raises(CapacityError, match=r"pinning .* failed.*--host-mem"):
        HostPagePool(4, 4096, pin=True)
    assert pinned_bytes_in_use() == base


# --- NvmeStore: round trips -------------------------------------------------------------------

slot_sets = st.one_of(
    st.tuples(st.integers(0, 39)).map(list),                                         # one slot
    st.tuples(st.integers(0, 39), st.integers(1, 12)).map(lambda t: list(range(t[0], min(40, t[0] + t[1])))),
    st.lists(st.integers(0, 39), min_size=0, max_size=20),                            # any, repeats
)
ops = st.lists(st.tuples(st.sampled_from(["write", "read"]), slot_sets,
                         st.sampled_from(["pool", "tensor", "rows", "misaligned"])), min_size=1, max_size=12)


def buffers(kind: str, n: int, slot_bytes: int, pool: HostPagePool):
    """n slot-sized buffers of one kind: aligned pool rows, a plain tensor, scattered pool rows, or
    a tensor deliberately off 4096-byte alignment (takes the O_DIRECT bounce path)."""
    if kind == "pool":
        return pool.slots_view(torch.uint8, (slot_bytes,))[:n]
    if kind == "tensor":
        return torch.empty(n, slot_bytes, dtype=torch.uint8)
    if kind == "rows":  # distinct, out of order, not consecutive in memory (7 is prime to 24)
        if n > pool.num_slots:
            return [torch.empty(slot_bytes, dtype=torch.uint8) for _ in range(n)]
        v = pool.slots_view(torch.uint8, (slot_bytes,))
        return [v[(7 * i + 3) % pool.num_slots] for i in range(n)]
    flat = torch.empty(n * slot_bytes + 64, dtype=torch.uint8)
    return flat[64:].view(n, slot_bytes)


@pytest.mark.parametrize("split", [False, True], ids=["default-tasks", "tiny-tasks"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(slot_bytes=st.sampled_from([4096, 8192]), threads=st.integers(1, 4), direct=st.booleans(), ops=ops)
def test_store_matches_dict_model(tmp_path, monkeypatch, split, slot_bytes, threads, direct, ops):
    if split:  # one slot per task at most 3 per run: exercises splitting across threads
        monkeypatch.setattr(nvme_store, "_MIN_TASK_BYTES", 0)
        monkeypatch.setattr(nvme_store, "_MAX_TASK_BYTES", 3 * slot_bytes)
    model: dict[int, torch.Tensor] = {}
    version = 0
    with NvmeStore(tmp_path, slot_bytes, 40, io_threads=threads, use_direct_io=direct) as store, \
            HostPagePool(24, slot_bytes) as pool:
        written = read = 0
        for op, ids, kind in ops:
            if kind == "pool" and len(ids) > pool.num_slots:
                kind = "tensor"
            buf = buffers(kind, len(ids), slot_bytes, pool)
            rows = list(buf) if isinstance(buf, torch.Tensor) else buf
            if op == "write":
                for i, s in enumerate(ids):
                    version += 1
                    rows[i].copy_(pattern(s, version, slot_bytes))
                    model[s] = rows[i].clone()  # a repeated slot: the last row wins
                store.write(ids, buf)
                written += len(set(ids)) * slot_bytes
            else:
                fut = store.read_into(ids, buf)
                assert fut.result(timeout=30) is buf
                read += len(ids) * slot_bytes
                for i, s in enumerate(ids):
                    want = model.get(s, torch.zeros(slot_bytes, dtype=torch.uint8))  # preallocated: zeros
                    assert torch.equal(rows[i], want), f"slot {s} differs"
        assert (store.bytes_written, store.bytes_read) == (written, read)
    assert leftovers(tmp_path) == []


def test_store_rejects_bad_arguments(tmp_path):
    with NvmeStore(tmp_path, 4096, 4) as store:
        with pytest.raises(IndexError):
            store.write([4], torch.zeros(1, 4096, dtype=torch.uint8))
        with pytest.raises(ValueError):
            store.write([0, 1], torch.zeros(1, 4096, dtype=torch.uint8))
        with pytest.raises(TypeError):
            store.write([0], torch.zeros(1, 1024, dtype=torch.float32))
        store.read_into_sync([], torch.zeros(0, 4096, dtype=torch.uint8))
    with pytest.raises(LcrunError, match="closed"):
        store.read_into_sync([0], torch.zeros(1, 4096, dtype=torch.uint8))
    with pytest.raises(ValueError):
        NvmeStore(tmp_path, 1000, 4)


# --- folder, mode, cleanup -----------------------------------------------------------------------

def test_private_folder_mode_and_removal(tmp_path):
    kv = tmp_path / "new" / "kv"  # created when missing
    store = NvmeStore(kv, 4096, 8)
    assert store.path.parent == kv.absolute() and store.path.name.startswith(f"lcrun-kv-{os.getpid()}-")
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o700
    assert (store.path / nvme_store.DATA_FILE).stat().st_size == 8 * 4096
    store.close()
    store.close()
    assert store.closed and not store.path.exists() and leftovers(kv) == []


def test_dropping_the_store_removes_the_folder(tmp_path):
    store = NvmeStore(tmp_path, 4096, 4)
    path = store.path
    del store
    assert not path.exists()


def test_unwritable_kv_dir_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LcrunError, match=str(blocker / "kv")):
        NvmeStore(blocker / "kv", 4096, 4)


def test_app_signal_handler_is_kept(tmp_path):
    from lcrun.exit_signals import exit_cleanly_on_signals

    def mine(signum, frame):
        pass

    signal.signal(signal.SIGTERM, mine)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    exit_cleanly_on_signals()
    assert signal.getsignal(signal.SIGTERM) is mine
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN


def test_a_store_installs_no_signal_handler(tmp_path):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with NvmeStore(tmp_path, 4096, 4):
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


CHILD = textwrap.dedent("""
    import signal, sys, time, torch
    from lcrun.exit_signals import exit_cleanly_on_signals
    from lcrun.offload import NvmeStore
    exit_cleanly_on_signals()  # what the lcrun command does: SIGTERM then runs the finalizers
    # Python keeps SIGINT ignored if the parent ran us with it ignored (a background job):
    # give the child what an interactive start gives.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    store = NvmeStore(sys.argv[1], 4096, 64, io_threads=2)
    buf = torch.full((64, 4096), 3, dtype=torch.uint8)
    store.write(range(64), buf)
    print(store.path, flush=True)
    if sys.argv[2] == "exit":
        sys.exit(0)  # no close(): the atexit finalizer must clean up
    while True:  # busy with I/O when the signal lands
        store.read_into_sync(range(64), buf)
        store.write(range(0, 64, 2), buf[:32])
        time.sleep(0.001)
""")


@pytest.mark.parametrize("how", ["exit", "SIGTERM", "SIGINT"])
def test_folder_removed_on_exit_and_signals(tmp_path, how):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), how], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        path = Path(proc.stdout.readline().strip())
        assert path.parent == tmp_path, proc.stderr.read()
        if how != "exit":
            assert path.is_dir()
            proc.send_signal(getattr(signal, how))
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not path.exists() and leftovers(tmp_path) == []
    assert rc == {"exit": 0, "SIGTERM": 128 + signal.SIGTERM, "SIGINT": -signal.SIGINT}[how], proc.stderr.read()


# --- capacity and disk full ----------------------------------------------------------------------

def test_upfront_free_space_check(tmp_path):
    free = psutil.disk_usage(str(tmp_path)).free
    with pytest.raises(CapacityError) as e:
        NvmeStore(tmp_path, 1 << 20, free // (1 << 20) + 16)
    msg = str(e.value)
    assert "free" in msg and "--kv-dir" in msg and "--host-mem" in msg and "--ctx" in msg
    assert leftovers(tmp_path) == []


def test_enospc_on_write_closes_and_removes(tmp_path, monkeypatch):
    store = NvmeStore(tmp_path, 4096, 16, io_threads=2)
    path = store.path

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nvme_store.os, "pwritev", full)
    with pytest.raises(CapacityError, match="disk full while spilling KV pages"):
        store.write(range(16), torch.zeros(16, 4096, dtype=torch.uint8))
    assert store.closed and not path.exists() and leftovers(tmp_path) == []


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs, when this process may mount one (root in a sandbox); else skip."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (the ENOSPC path is covered by the monkeypatched test)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_tmpfs_upfront_and_preallocation(tiny_tmpfs, monkeypatch):
    with pytest.raises(CapacityError, match="needs 4.00 MiB"):
        NvmeStore(tiny_tmpfs, 4096, 1024)
    assert os.listdir(tiny_tmpfs) == []
    # The free-space check passes (lie about it): posix_fallocate then finds the disk full.
    real = nvme_store.shutil.disk_usage
    monkeypatch.setattr(nvme_store.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 40))
    with pytest.raises(CapacityError, match="disk full"):
        NvmeStore(tiny_tmpfs, 4096, 1024)
    assert os.listdir(tiny_tmpfs) == []


def test_tmpfs_disk_full_while_spilling(tiny_tmpfs, monkeypatch):
    # A sparse file (no preallocation, as on filesystems without fallocate), then another file
    # takes the space: the writes themselves hit ENOSPC.
    monkeypatch.setattr(nvme_store._Disk, "_preallocate", lambda self, n: os.ftruncate(self.fd, n))
    store = NvmeStore(tiny_tmpfs, 4096, 128)
    path = store.path
    fd = os.open(tiny_tmpfs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\1" * 4096):
            pass
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    with pytest.raises(CapacityError, match="disk full while spilling KV pages to " + re.escape(str(tiny_tmpfs))):
        store.write(range(128), torch.ones(128, 4096, dtype=torch.uint8))
    assert not path.exists() and os.listdir(tiny_tmpfs) == ["filler"]


# --- O_DIRECT ------------------------------------------------------------------------------------

def test_direct_io_reports_what_happened(tmp_path, monkeypatch):
    with NvmeStore(tmp_path, 4096, 4, use_direct_io=False) as s:
        assert s.direct_io is False
    with NvmeStore(tmp_path, 4096, 4) as s:
        assert isinstance(s.direct_io, bool)  # True on ext4/xfs, often False on tmpfs
    if not hasattr(os, "O_DIRECT"):
        return
    real_open = os.open

    def no_direct(path, flags, *a, **kw):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(nvme_store.os, "open", no_direct)
    with NvmeStore(tmp_path, 4096, 4) as s:
        assert s.direct_io is False
        s.write([2], torch.full((1, 4096), 9, dtype=torch.uint8))
        assert int(s.read_into_sync([2], torch.zeros(1, 4096, dtype=torch.uint8)).sum()) == 9 * 4096
    monkeypatch.setattr(nvme_store.os, "open", real_open)
    # open() accepts O_DIRECT but the I/O does not: the probe falls back to buffered I/O.
    monkeypatch.setattr(nvme_store._Disk, "_direct_io_works", lambda self: False)
    with NvmeStore(tmp_path, 4096, 4) as s:
        assert s.direct_io is False
        s.write([1], torch.full((1, 4096), 5, dtype=torch.uint8))
        assert int(s.read_into_sync([1], torch.zeros(1, 4096, dtype=torch.uint8)).sum()) == 5 * 4096
    assert leftovers(tmp_path) == []


def test_read_future_reports_io_errors(tmp_path, monkeypatch):
    with NvmeStore(tmp_path, 4096, 4) as s:
        def broken(*a, **k):
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(nvme_store.os, "preadv", broken)
        fut = s.read_into([0, 1], torch.zeros(2, 4096, dtype=torch.uint8))
        with pytest.raises(LcrunError, match="reading KV pages"):
            fut.result(timeout=10)


# --- on a GPU: the pool is pinned and device-readable in place ----------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_pool_is_read_by_the_gpu_in_place():
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")

    @triton.jit
    def copy(src, dst, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + i, tl.load(src + i, mask=i < n), mask=i < n)

    class HostPointer:  # what Triton needs of an argument: the address (UVA) and a dtype
        dtype = torch.float16

        def __init__(self, ptr):
            self.ptr = ptr

        def data_ptr(self):
            return self.ptr

    base = pinned_bytes_in_use()
    with HostPagePool(64, 16384) as pool:
        assert pool.pinned
        kv = pool.slots_view(torch.float16, (2, 32, 128))
        kv.copy_(torch.randn(kv.shape).half())
        out = torch.empty(kv.numel(), dtype=torch.float16, device="cuda")
        copy[(triton.cdiv(kv.numel(), 1024),)](HostPointer(pool.data_ptr()), out, kv.numel(), BLOCK=1024)
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), kv.reshape(-1))
    assert pinned_bytes_in_use() == base
