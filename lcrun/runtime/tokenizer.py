"""Text <-> token ids, the chat template and stop tokens of a model, whatever file they came from."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from lcrun.errors import ModelLoadError


@dataclass
class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus what chat needs: the template, special tokens and stop ids.

    ``encode(text)`` adds the special tokens the tokenizer's post-processor defines (BOS for
    Llama); rendered chat text is encoded with ``add_special_tokens=False`` because the template
    already wrote them, as transformers does.
    """

    tokenizer: Tokenizer
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    stop_ids: set[int] = field(default_factory=set)
    source: str = ""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_hf_folder(cls, folder: Path, eos_token_ids: list[int] | None = None) -> "TextTokenizer":
        """tokenizer.json + tokenizer_config.json (+ chat_template.jinja, generation_config.json)."""
        tok_path = folder / "tokenizer.json"
        if not tok_path.is_file():
            raise ModelLoadError(f"{tok_path}: missing; lcrun needs the fast tokenizer file tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise ModelLoadError(f"{tok_path}: not a readable tokenizer ({exc})") from None
        tcfg = _read_json(folder / "tokenizer_config.json") or {}
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_path = folder / "chat_template.jinja"
        if jinja_path.is_file():
            template = jinja_path.read_text(encoding="utf-8")
        bos, eos = _token_text(tcfg.get("bos_token")), _token_text(tcfg.get("eos_token"))
        stop_ids = set(eos_token_ids or [])
        gen = _read_json(folder / "generation_config.json") or {}
        gen_eos = gen.get("eos_token_id")
        if gen_eos is not None:
            stop_ids |= {gen_eos} if isinstance(gen_eos, int) else set(gen_eos)
        out = cls(tokenizer, template, bos, eos, stop_ids, str(folder))
        if eos is not None and out.token_id(eos) is not None:
            out.stop_ids.add(out.token_id(eos))
        return out


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, holding back an incomplete UTF-8 tail."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character is still arriving
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta
