"""Saved contexts against prefill: is loading a long context from disk faster than computing it?

Prefills a random prompt of ``--context`` tokens through the default path (the flags given, as
`lcrun run` would), decodes 8 tokens, saves the context (LLM.save_context) and goes on for
``--tokens`` more; then a new process loads it (LLM.load_context) and asks for the same
continuation: the load time against the prefill time, the file's size and the disk's rates, and
whether the continuation is the same (it must be: the same KV, and in both processes the last
saved token is computed again by the same decode path). The page cache is dropped before the load
where the process may do so (root on Linux), so the read comes from the disk.

    python -m perf.diag.saved_context --model synthetic:llama-3.1-8b --context 128k --gpu-mem 24GiB \\
        --path /tmp/ctx/128k.lcctx --out $OUT/saved-context-128k.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from lcrun.api import LLM
from lcrun.profiling.bench import random_prompt
from lcrun.profiling.meta import run_metadata
from lcrun.units import parse_tokens


def drop_page_cache(path: Path) -> bool:
    """Evict ``path`` from the page cache (POSIX_FADV_DONTNEED after a sync); True if it could."""
    subprocess.run(["sync"], check=False)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:llama-3.1-8b")
    ap.add_argument("--context", default="128k", help="prompt tokens to prefill and save")
    ap.add_argument("--gpu-mem", default=None)
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens compared after the load")
    ap.add_argument("--path", required=True, help="where to write the saved context")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--stage", choices=("all", "save", "load"), default="all",
                    help="all: save, then load in a new process (each stage runs as its own process)")
    args = ap.parse_args(argv)
    n = parse_tokens(args.context)
    settings = {"ctx": n + args.tokens + 64, "gpu_mem": args.gpu_mem, "progress": False}
    path = Path(args.path)
    path.parent.mkdir(parents=True, exist_ok=True)

    if args.stage == "save":
        llm = LLM(args.model, **settings)
        prompt = random_prompt(llm.model_config.vocab_size, n, seed=0)
        head = list(llm.stream_ids(prompt, max_new_tokens=8))
        prefill_s = llm.last_stats.prefill_s
        t0 = time.perf_counter()
        nbytes = llm.save_context(str(path))
        save_s = time.perf_counter() - t0
        # what the loaded context must reproduce: the same process going on from the saved tokens
        # (the last one recomputed, as after a load)
        uninterrupted = list(llm.stream_ids(prompt + head, max_new_tokens=args.tokens))
        Path(str(path) + ".json").write_text(json.dumps(
            {"head": head, "uninterrupted": uninterrupted, "prefill_s": prefill_s, "save_s": save_s,
             "file_bytes": nbytes, "plan": {"attention": llm.attention, "reason": llm.attention_reason,
                                            "all_on_gpu": bool(llm.plan and llm.plan.all_on_gpu)},
             "peak_gpu_bytes_save": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}))
        return
    if args.stage == "load":
        saved = json.loads(Path(str(path) + ".json").read_text())
        llm = LLM(args.model, **settings)
        prompt = random_prompt(llm.model_config.vocab_size, n, seed=0)
        dropped = drop_page_cache(path)
        t0 = time.perf_counter()
        llm.load_context(str(path))
        load_s = time.perf_counter() - t0
        resumed = list(llm.stream_ids(prompt + saved["head"], max_new_tokens=args.tokens))
        want, stats = saved["uninterrupted"], llm.last_stats
        Path(str(path) + ".load.json").write_text(json.dumps(
            {"page_cache_dropped": dropped, "load_s": load_s, "prefill_after_load_s": stats.prefill_s,
             "reused_tokens": stats.reused_tokens, "same_tokens": want == resumed,
             "first_mismatch": next((i for i, (a, b) in enumerate(zip(want, resumed)) if a != b), None),
             "peak_gpu_bytes_load": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}))
        return
    # each half in its own process, as a user saves in one session and loads in a later one
    for stage in ("save", "load"):
        subprocess.run([sys.executable, "-m", "perf.diag.saved_context", *(argv if argv is not None else sys.argv[1:]),
                        "--stage", stage], check=True)
    saved = json.loads(Path(str(path) + ".json").read_text())
    loaded = json.loads(Path(str(path) + ".load.json").read_text())
    nbytes, prefill_s, save_s, load_s = saved["file_bytes"], saved["prefill_s"], saved["save_s"], loaded["load_s"]
    row = {"context": n, "file_bytes": nbytes, "prefill_s": prefill_s, "save_s": save_s,
           "save_gb_s": nbytes / save_s / 1e9, "load_gb_s": nbytes / load_s / 1e9, "load_vs_prefill": prefill_s / load_s,
           "tokens_compared": args.tokens, **{k: v for k, v in saved.items() if k not in ("head", "uninterrupted")}, **loaded}
    for suffix in (".json", ".load.json"):
        Path(str(path) + suffix).unlink()
    print(json.dumps(row, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"kind": "lcrun.saved_context", "meta": run_metadata(), "settings": vars(args),
                               "rows": [row]}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
