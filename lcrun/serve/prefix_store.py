"""`lcrun serve --context-dir`: the prefix cache on disk. After a request whose prompt is long, the
cache's tokens and KV are saved as DIR/<hash of the token ids>.lcctx; before a request, the saved
context sharing the longest prefix with its prompt is loaded when it beats what the cache holds, so
a restarted server does not prefill a long document again. Runs on the scheduler's worker thread."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lcrun.runtime.context_file import ContextFileError, read_ids

if TYPE_CHECKING:
    from lcrun.api import LLM

log = logging.getLogger("lcrun.serve")

SUFFIX = ".lcctx"


def ids_key(ids: list[int] | torch.Tensor) -> str:
    return hashlib.sha256(torch.as_tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()[:32]


def _common(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


class PrefixStore:
    def __init__(self, folder: str | Path, llm: "LLM", min_tokens: int):
        self.folder, self.llm, self.min_tokens = Path(folder), llm, min_tokens  # checked by ServeSettings
        self.saved: dict[Path, torch.Tensor] = {}  # file -> its token ids
        for path in sorted(self.folder.glob("*" + SUFFIX)):
            try:
                self.saved[path] = read_ids(path)
            except ContextFileError as exc:  # one bad file must not stop the server
                log.warning("--context-dir: skipping %s (%s)", path.name, exc)
        self.loads = self.saves = 0

    def restore(self, ids: list[int]) -> None:
        """Load the saved context sharing the longest prefix with ``ids``, when it shares more than the
        cache does already and at least ``min_tokens``."""
        want = torch.tensor(ids, dtype=torch.int64)
        have = _common(torch.tensor(self.llm.generator.cached_ids, dtype=torch.int64), want)
        best, best_n = None, max(have, self.min_tokens - 1)
        for path, saved in self.saved.items():
            n = _common(saved, want)
            if n > best_n:
                best, best_n = path, n
        if best is None:
            return
        try:
            self.llm.load_context(str(best))
            self.loads += 1
            log.info("--context-dir: loaded %s (%d tokens shared)", best.name, best_n)
        except ContextFileError as exc:  # e.g. saved by another model into the same folder
            log.warning("--context-dir: cannot use %s (%s)", best.name, exc)
            del self.saved[best]

    def keep(self, prompt_tokens: int) -> None:
        """Save the cache (prompt and reply) after a request whose prompt had ``min_tokens`` or more."""
        ids = self.llm.generator.cached_ids
        if prompt_tokens < self.min_tokens or not ids:
            return
        path = self.folder / (ids_key(ids) + SUFFIX)
        if path in self.saved:
            return
        try:
            self.llm.save_context(str(path))
        except ContextFileError as exc:  # e.g. a full disk: the answer was already sent
            log.warning("--context-dir: %s", exc)
            return
        self.saved[path] = torch.tensor(ids, dtype=torch.int64)
        self.saves += 1
