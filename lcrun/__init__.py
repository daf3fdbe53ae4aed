"""lcrun: long-context LLM inference on one consumer GPU."""
import os

# Under a hard --gpu-mem cap, memory the caching allocator holds in half-used segments counts
# against the cap: a 512K run on the H200 stopped with 1.43 GiB reserved but unallocated.
# Expandable segments grow one mapped range instead. Set before torch touches CUDA; a user's own
# allocator settings win.
if not any(os.environ.get(v) for v in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")):
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

from lcrun.config import LcrunConfig
from lcrun.errors import LcrunError

__version__ = "0.1.0"
__all__ = ["LLM", "LcrunConfig", "LcrunError", "__version__"]


def __getattr__(name):
    # Importing torch is slow: only `from lcrun import LLM` pays for it.
    if name == "LLM":
        from lcrun.api import LLM
        return LLM
    raise AttributeError(name)
