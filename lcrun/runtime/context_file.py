"""Saved contexts (.lcctx): a prefilled KV cache on disk, reloaded instead of prefilled again.

Layout: MAGIC, format version (u32), then blocks. A block is a u64 length and its bytes; the first
is the JSON header (model fingerprint, the cache's layout, token count, the saver's metadata), then
one JSON record head and its raw bytes per tensor (the token ids, then each layer's tensors in
layer order), then an ``end`` record with the CRC-32 of every byte before it but the tensors'. Each tensor record
carries its own CRC-32, so a load checks as it streams, one layer in memory at a time; a load that
finds a damaged record empties the cache. A save writes a temporary file beside the target,
fsyncs it and renames it over the target: an interrupted save leaves the old file as it was."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
import torch

from lcrun.errors import LcrunError
from lcrun.runtime.generate import Generator
from lcrun.runtime.model_config import ModelConfig

MAGIC = b"LCRUNCTX"
FORMAT_VERSION = 1
HEADER_HASH_BYTES = 1 << 20  # of each weight file: its header (names, shapes, metadata) and first tensors


class ContextFileError(LcrunError):
    """A saved context that cannot be read, or was made for another model or cache layout."""


def model_fingerprint(model_spec: str, model_cfg: ModelConfig, seed: int) -> dict[str, Any]:
    """What identifies a model's KV: its architecture and shapes, and a hash of its weight files'
    headers (random synthetic weights: the spec and the seed that made them)."""
    shapes = {k: model_cfg.to_dict()[k] for k in ("arch", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                                                   "hidden_size", "vocab_size")}
    digest = hashlib.sha256()
    path = Path(str(model_spec))
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".gguf", ".json")) \
        if path.is_dir() else [path] if path.is_file() else []
    if not files:
        digest.update(f"{model_spec} seed={seed}".encode())
    for f in files:
        with open(f, "rb") as fh:
            digest.update(f"{f.name}:{f.stat().st_size}:".encode())
            digest.update(fh.read(HEADER_HASH_BYTES))
    return {**shapes, "weights": digest.hexdigest()[:32]}


# -- writing -----------------------------------------------------------------------------------------
class _Out:
    def __init__(self, f: BinaryIO):
        self.f, self.crc = f, 0

    def write(self, data) -> None:
        self.crc = zlib.crc32(data, self.crc)
        self.f.write(data)

    def block(self, payload: bytes) -> None:
        self.write(struct.pack("<Q", len(payload)))
        self.write(payload)

    def tensor(self, name: str, t: torch.Tensor) -> None:
        data = _as_bytes(t)
        head = {"name": name, "dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                "nbytes": data.nbytes, "crc": zlib.crc32(data)}
        self.block(json.dumps(head).encode())
        self.f.write(data)  # covered by the record's own CRC, not the running one


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)


def save_context(path: str | os.PathLike, generator: Generator, fingerprint: dict[str, Any],
                 meta: dict[str, Any] | None = None) -> int:
    """Write the generator's cached tokens and their KV to ``path`` atomically; returns its bytes."""
    cache, ids = generator.cache, generator.cached_ids
    if not ids:
        raise ContextFileError("the context is empty: generate something before saving it")
    path = Path(path)
    header = {"format": FORMAT_VERSION, "model": fingerprint, "layout": cache.snapshot_layout(), "tokens": len(ids),
              "layers": cache.cfg.num_layers, "meta": meta or {}}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            out = _Out(f)
            out.write(MAGIC + struct.pack("<I", FORMAT_VERSION))
            out.block(json.dumps(header).encode())
            out.tensor("ids", torch.tensor(ids, dtype=torch.int64))
            cache.begin_export()
            try:
                for layer in range(cache.cfg.num_layers):
                    for name, t in cache.export_layer(layer).items():
                        out.tensor(f"{layer}.{name}", t)
            finally:
                cache.end_export()
            out.block(json.dumps({"name": "end", "crc": out.crc}).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ContextFileError(f"cannot save the context to {path}: {exc.strerror or exc} (nothing was written)") \
            from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- reading -----------------------------------------------------------------------------------------
class _In:
    def __init__(self, f: BinaryIO, path: Path):
        self.f, self.path, self.crc = f, path, 0

    def read(self, n: int, what: str, running: bool = True) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ContextFileError(f"{self.path}: truncated (it ends inside {what}): save the context again")
        if running:  # tensor bytes have their own CRC
            self.crc = zlib.crc32(data, self.crc)
        return data

    def block(self, what: str, limit: int = 1 << 30) -> dict[str, Any]:
        (n,) = struct.unpack("<Q", self.read(8, what))
        if n > limit:
            raise ContextFileError(f"{self.path}: damaged ({what} claims {n} bytes)")
        try:
            return json.loads(self.read(n, what))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ContextFileError(f"{self.path}: damaged ({what} is not readable)") from None

    def records(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, CPU tensor) for every tensor record, checked; then the end record."""
        while True:
            crc_before = self.crc
            head = self.block("a record head", limit=1 << 20)
            if head.get("name") == "end":
                if head.get("crc") != crc_before:
                    raise ContextFileError(f"{self.path}: checksum mismatch: the file is damaged")
                return
            try:
                name, dtype, shape, nbytes = head["name"], getattr(torch, head["dtype"]), head["shape"], head["nbytes"]
            except (KeyError, AttributeError, TypeError):
                raise ContextFileError(f"{self.path}: damaged (a record head is malformed)") from None
            data = bytearray(self.read(nbytes, f"record {name}", running=False))
            if zlib.crc32(data) != head.get("crc"):
                raise ContextFileError(f"{self.path}: checksum mismatch in record {name}: the file is damaged")
            flat = torch.frombuffer(data, dtype=torch.uint8) if nbytes else torch.zeros(0, dtype=torch.uint8)
            try:
                yield name, flat.view(dtype).view(shape)
            except RuntimeError:
                raise ContextFileError(f"{self.path}: damaged (record {name} does not hold {shape} {dtype})") from None


def _open(path: Path) -> tuple[BinaryIO, _In, dict[str, Any]]:
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise ContextFileError(f"cannot open the saved context {path}: {exc.strerror or exc}") from None
    src = _In(f, path)
    try:
        start = f.read(len(MAGIC) + 4)
        if start[:len(MAGIC)] != MAGIC:
            raise ContextFileError(f"{path} is not an lcrun saved context (make one with --save-context)")
        src.crc = zlib.crc32(start)
        (version,) = struct.unpack("<I", start[len(MAGIC):]) if len(start) == len(MAGIC) + 4 else (None,)
        if version != FORMAT_VERSION:
            raise ContextFileError(f"{path} has context format {version}; this lcrun reads format {FORMAT_VERSION}: "
                                   "save the context again with this version")
        return f, src, src.block("the header")
    except BaseException:
        f.close()
        raise


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """A saved context's header (model fingerprint, layout, token count, metadata), unchecked."""
    f, _, header = _open(Path(path))
    f.close()
    return header


def read_ids(path: str | os.PathLike) -> torch.Tensor:
    """A saved context's token ids (int64), read without its KV."""
    path = Path(path)
    f, src, header = _open(path)
    with f:
        name, ids = next(src.records(), ("", None))
    if name != "ids" or ids is None or ids.numel() != header.get("tokens"):
        raise ContextFileError(f"{path}: damaged (the token ids are missing)")
    return ids


def _differences(what: str, saved: dict[str, Any], here: dict[str, Any]) -> list[str]:
    return [f"{what} {k}: {saved.get(k)!r} in the file, {here.get(k)!r} here"
            for k in sorted(set(saved) | set(here)) if saved.get(k) != here.get(k)]


def load_context(path: str | os.PathLike, generator: Generator, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Restore a saved context into the generator's cache (refused, with what differs, when the
    model or the cache layout is not the one it was saved from); returns its header."""
    path = Path(path)
    cache = generator.cache
    f, src, header = _open(path)
    with f:
        diff = _differences("model", header.get("model", {}), fingerprint)
        diff += _differences("cache", header.get("layout", {}), cache.snapshot_layout())
        if diff:
            raise ContextFileError(f"{path} was saved for another model or cache setup ({'; '.join(diff)}): "
                                   "load it with the settings it was saved with")
        tokens = header["tokens"]
        if tokens + 1 > cache.capacity:
            raise ContextFileError(f"{path} holds {tokens:,} tokens, more than the context of {cache.capacity:,} "
                                   f"leaves room for (one token is kept free to answer): raise --ctx")
        generator.reset()
        cache.begin_import(tokens)
        try:
            _import(src, cache, header, generator)
        except RuntimeError as exc:  # a tensor that does not fit where the layout said it would
            generator.reset()
            raise ContextFileError(f"{path}: its tensors do not fit this cache ({str(exc).splitlines()[0]})") from None
        except BaseException:
            generator.reset()
            raise
    return header


def _import(src: _In, cache, header: dict[str, Any], generator: Generator) -> None:
    records = src.records()
    name, ids = next(records, ("", None))
    if name != "ids" or ids is None or ids.numel() != header["tokens"]:
        raise ContextFileError(f"{src.path}: damaged (the token ids are missing)")
    layer, tensors = 0, {}
    for name, t in records:
        index, _, key = name.partition(".")
        if not index.isdigit() or int(index) not in (layer, layer + 1):
            raise ContextFileError(f"{src.path}: damaged (record {name} is out of order)")
        if int(index) != layer:
            cache.import_layer(layer, tensors)
            layer, tensors = layer + 1, {}
        tensors[key] = t.to(cache.device)
    if layer != header["layers"] - 1 or not tensors:
        raise ContextFileError(f"{src.path}: damaged (it holds {layer + 1} of {header['layers']} layers)")
    cache.import_layer(layer, tensors)
    cache.end_import(header["tokens"])
    generator.restored(ids.tolist())
