"""HF model folders: config.json, model.safetensors (or a sharded index) and tokenizer files.

Tensors are read one at a time through safetensors' memory map, never whole files into RAM."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lcrun.errors import ModelLoadError
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.tokenizer import TextTokenizer
from lcrun.units import short_dtype

INDEX_NAME = "model.safetensors.index.json"
# where image-text checkpoints keep their text model (transformers 4 and 5 layouts); vision tensors are left out
_TEXT_MODEL_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                        ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))
SINGLE_NAME = "model.safetensors"


class HFFolderSource:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = str(self.folder)
        cfg_path = self.folder / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(
                f"{self.folder}: no config.json, so this is not an HF model folder "
                "(expected config.json, model.safetensors or model.safetensors.index.json, tokenizer.json)")
        try:
            raw = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{cfg_path}: not valid JSON ({exc})") from None
        self.config = ModelConfig.from_hf(raw, source=str(cfg_path))
        dtype = raw.get("torch_dtype") or raw.get("dtype")
        self.stored = f"{short_dtype(dtype)} safetensors" if isinstance(dtype, str) else "safetensors"
        self._where = self._index_tensors()
        # tensor name as the runtime asks for it -> as the files store it
        self._stored = {name: name for name in self._where}
        if isinstance(raw.get("text_config"), dict):  # Gemma 3's image-text checkpoints: the text model's tensors
            self._stored = {new + name[len(old):]: name for name in self._where
                            for old, new in _TEXT_MODEL_PREFIXES if name.startswith(old)}
        self._handles: dict[Path, object] = {}

    def _index_tensors(self) -> dict[str, Path]:
        index = self.folder / INDEX_NAME
        single = self.folder / SINGLE_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
                raise ModelLoadError(f"{index}: not a valid safetensors index ({exc})") from None
            where = {name: self.folder / shard for name, shard in weight_map.items()}
            for shard in sorted(set(where.values())):
                if not shard.is_file():
                    raise ModelLoadError(f"{shard}: missing shard listed in {INDEX_NAME}; download it again")
            return where
        if single.is_file():
            with self._open(single) as f:
                return {name: single for name in f.keys()}
        if any(self.folder.glob("*.bin")) or any(self.folder.glob("*.pth")):
            raise ModelLoadError(
                f"{self.folder}: only PyTorch pickle weights (.bin/.pth) found; lcrun reads safetensors: "
                "convert them or download the safetensors files")
        raise ModelLoadError(f"{self.folder}: no {SINGLE_NAME} or {INDEX_NAME}; the weights are missing")

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: not a readable safetensors file ({exc}); download it again") from None

    def names(self) -> list[str]:
        return list(self._stored)

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        stored = self._stored[name]
        path = self._where[stored]
        if path not in self._handles:
            self._handles[path] = self._open(path).__enter__()
        try:
            tensor = self._handles[path].get_tensor(stored)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: tensor {name!r} cannot be read ({exc}); the file is corrupt") from None
        return tensor.to(dtype)

    def block_format(self, name: str) -> None:
        return None

    def get_blocks(self, name: str) -> None:
        return None  # safetensors checkpoints are dense (--weights q8_0/q4_0 quantizes them on load)

    def tokenizer(self) -> TextTokenizer:
        return TextTokenizer.from_hf_folder(self.folder, self.config.eos_token_ids)
