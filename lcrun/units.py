"""Parsing of human sizes: token counts ('256k') and byte sizes ('24GiB')."""
from __future__ import annotations

import os
import re

from lcrun.errors import ConfigError

_TOKEN_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_tokens(value: str | int) -> int:
    """'4096' -> 4096, '32k'/'32K' -> 32768, '1M' -> 1048576 (k = 1024, M = 1024**2)."""
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(f"a token count must be positive, got {value}")
        return value
    m = _TOKEN_RE.match(str(value))
    if not m:
        raise ConfigError(f"cannot read {value!r} as a token count: use a number like 4096, 32k, 128K or 1M")
    n = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]
    if n < 1 or n != int(n):
        raise ConfigError(f"{value!r} is not a whole, positive number of tokens")
    return int(n)


def parse_bytes(value: str | int) -> int:
    """'24GiB' -> 24*2**30, '16GB' -> 16e9, '512M' -> 512*2**20 (a bare unit letter is binary)."""
    if isinstance(value, int):
        return value
    m = _BYTES_RE.match(str(value))
    if not m:
        raise ConfigError(f"cannot read {value!r} as a size: use e.g. 24GiB, 16GB or 512MiB")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    exp = "KMGT".index(unit) + 1 if unit else 0
    explicit_decimal = unit and not binary and str(value).strip().upper().endswith(unit + "B")
    base = 1000 if explicit_decimal else 1024
    return int(num * base**exp)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_count(n: float) -> str:
    """A count for people: 134515008 -> 135M, 8030261248 -> 8.0B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}" if n < 10 * size else f"{n / size:.0f}{unit}"
    return f"{n:.0f}"


_SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def short_dtype(name: str) -> str:
    """bfloat16 or torch.bfloat16 -> bf16: a dtype as plans and model names show it."""
    name = name.removeprefix("torch.")
    return _SHORT_DTYPES.get(name, name)


def env_number(name: str, default: float, minimum: float = 0.0) -> float:
    """The number in environment variable ``name`` (``default`` when unset or empty); a value that
    is not a number >= ``minimum`` is a ConfigError naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= minimum:
        raise ConfigError(f"{name}={raw!r}: expected a number >= {minimum:g}")
    return value
