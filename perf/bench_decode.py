"""Decode ms/token and prefill time of lcrun beside transformers, on the same shape, in one run.

    python perf/bench_decode.py --model synthetic:llama-3.1-8b --contexts 4096 --transformers

The flags of the scripts in perf/device_suite.sh; the work is `lcrun bench`'s
(``lcrun.profiling.bench``), and the JSON is its document.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcrun.config import LcrunConfig  # noqa: E402
from lcrun.profiling.bench import Sweep, format_rows, run_sweep  # noqa: E402
from lcrun.units import parse_tokens  # noqa: E402
from perf.common import write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:llama-3.1-8b")
    ap.add_argument("--contexts", default="4096", help="comma-separated token counts")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--attention", default="dense")
    ap.add_argument("--prefill-chunk", type=int, default=4096)
    ap.add_argument("--gpu-mem", default=None)
    ap.add_argument("--host-mem", default=None)
    ap.add_argument("--kv-dir", default=None)
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--trace", default=None, help="write a Chrome trace of 3 decode steps (first context)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--transformers", action="store_true", help="also time transformers' dynamic cache")
    ap.add_argument("--transformers-offloaded", action="store_true", help="also time its offloaded cache")
    ap.add_argument("--name", default="bench_decode")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    settings = {"model": args.model, "attention": args.attention, "prefill_chunk": args.prefill_chunk,
                "dtype": args.dtype}
    for key in ("gpu_mem", "host_mem", "kv_dir", "budget"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    config = LcrunConfig.from_kwargs(**settings)
    caches = (["dense"] if args.transformers else []) + (["offloaded"] if args.transformers_offloaded else [])
    # The old script ran transformers without a cap: keep that, so its numbers stay comparable.
    sweep = Sweep(contexts=[parse_tokens(c) for c in args.contexts.split(",")], steps=args.steps,
                  transformers=caches, transformers_capped=False, trace=args.trace)
    result = run_sweep(config, sweep, log=lambda m: print(m, file=sys.stderr))
    path = write_result(args.name, result, args.out)
    print(format_rows(result["rows"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
