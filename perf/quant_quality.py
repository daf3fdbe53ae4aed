"""Teacher-forced quality of one model under several --weights modes: perplexity on a prose text
and top-1 agreement of each mode's next-token prediction with the first mode's.

    python -m perf.quant_quality --modes bf16,auto,q8_0 --tokens 1024 --out OUT.json

The model defaults to the demo model (a Q4_1 GGUF: ``auto`` runs its own blocks, ``bf16`` the
same values dequantized, ``q8_0`` those values quantized again). The text defaults to the history
section of Python's LICENSE file (plain English prose that every Python install carries);
--text FILE takes another. fp32 activations, on the CPU or (--device cuda) the GPU; on the CPU
the quantized modes dequantize every matrix per call (minutes for 512 tokens on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import math
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

from lcrun.runtime.build import load_model
from lcrun.runtime.kv_cache import DenseCache
from lcrun.runtime.loading import default_model, open_source
from lcrun.profiling.meta import run_metadata


def default_text() -> str:
    lic = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if not lic.exists():
        raise SystemExit(f"{lic} not found: pass --text FILE")
    return lic.read_text(encoding="utf-8")


def all_logits(model, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    cache = DenseCache(model.cfg, ids.numel() + 1, model.device, model.dtype)
    return torch.cat([model.forward(ids[s:s + chunk], cache, all_logits=True) for s in range(0, ids.numel(), chunk)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--modes", default="bf16,auto,q8_0", help="--weights values; the first is the reference")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--text", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    source = open_source(args.model or default_model())
    text = Path(args.text).read_text(encoding="utf-8") if args.text else default_text()
    ids = torch.tensor(source.tokenizer().encode(text)[:args.tokens])
    device = torch.device(args.device)
    dtype = torch.float32  # modes differ by their weights alone, not by activation rounding
    ids = ids.to(device)
    rows, ref_top1 = [], None
    for mode in args.modes.split(","):
        model = load_model(source, device, dtype, weights=mode)
        with torch.inference_mode():
            logits = all_logits(model, ids, args.chunk)
        nll = F.cross_entropy(logits[:-1].float(), ids[1:]).item()
        top1 = logits[:-1].argmax(-1)
        ref_top1 = top1 if ref_top1 is None else ref_top1
        row = {"weights": mode, "format": model.weight_format(), "weight_bytes": model.weight_bytes(),
               "perplexity": math.exp(nll), "top1_agreement": (top1 == ref_top1).float().mean().item()}
        rows.append(row)
        print(f"{mode:6} {row['format']:10} {row['weight_bytes'] / 2**20:8.1f} MiB  ppl {row['perplexity']:8.3f}  "
              f"top-1 agreement with {args.modes.split(',')[0]} {row['top1_agreement']:.2%}", flush=True)
        del model
    result = {"kind": "lcrun.quant_quality", "meta": run_metadata(), "model": str(source.path),
              "text": args.text or "Python's LICENSE.txt", "tokens": ids.numel(), "device": str(device),
              "dtype": str(dtype).replace("torch.", ""), "rows": rows}
    path = Path(args.out or "quant-quality.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
