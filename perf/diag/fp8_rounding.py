"""Does the write-through's fp32 -> e4m3 rounding (lcrun.kernels.tiered._to_e4m3) give torch's
codes on this GPU? Compares it and Triton's own cast with torch (CUDA and CPU) on 65,536 bf16
values spread over 20 binades (ties are frequent: bf16 has 8 significant bits, e4m3 4).

    python -m perf.diag.fp8_rounding --out perf/results/diag-h200-fp8-rounding.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl


from lcrun.kernels.tiered import _to_e4m3
from lcrun.profiling.meta import run_metadata

N = 1 << 16


@triton.jit
def _round_both(x, by_helper, by_cast, N: tl.constexpr):
    offs = tl.arange(0, N)
    v = tl.load(x + offs).to(tl.float32)
    tl.store(by_helper + offs, _to_e4m3(v, 448.0))
    tl.store(by_cast + offs, v.to(tl.float8e4nv))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    spread = torch.exp2(torch.randint(-12, 8, (N,), generator=g).float())
    x = (torch.randn(N, generator=g) * spread).clamp(-440, 440).bfloat16().cuda()
    helper = torch.empty(N, dtype=torch.float8_e4m3fn, device="cuda")
    cast = torch.empty_like(helper)
    _round_both[(1,)](x, helper, cast, N=N)
    want = x.float().to(torch.float8_e4m3fn)

    def differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.view(torch.uint8).cpu() != b.view(torch.uint8).cpu())
    bad = differ(helper, want)
    first = bad.nonzero().flatten()[:12]
    out = dict(meta=run_metadata(), values=N, helper_vs_torch=int(bad.sum()), triton_cast_vs_torch=int(differ(cast, want).sum()),
               torch_cpu_vs_cuda=int(differ(x.float().cpu().to(torch.float8_e4m3fn), want).sum()),
               first_differences=dict(x=x.float().cpu()[first].tolist(), helper=helper.float().cpu()[first].tolist(),
                                      torch=want.float().cpu()[first].tolist()))
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "meta"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
