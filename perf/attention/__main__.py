"""python -m perf.attention: one decode-attention layer, top-k against dense (perf.attention.bench)."""
import os
import sys

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from perf.attention.bench import main  # noqa: E402

main()
