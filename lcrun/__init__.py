"""lcrun: long-context LLM inference on one consumer GPU."""
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
