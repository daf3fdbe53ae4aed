"""The real text for the fidelity test: standard-library docstrings, present on every machine
with Python, so the test needs no download."""
from __future__ import annotations

import hashlib
import importlib
import inspect
import platform
import warnings

TEXT_MODULES = ("argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses",
                "datetime", "decimal", "email.message", "functools", "http.client", "inspect", "itertools", "json",
                "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics",
                "string", "subprocess", "tarfile", "threading", "typing", "unittest", "urllib.request", "zipfile")


def _module_docs(mod, name: str, parts: list[str]) -> None:
    parts.append(f"# {name}\n\n{inspect.getdoc(mod) or ''}\n")
    for attr in sorted(a for a in dir(mod) if not a.startswith("_")):
        obj = getattr(mod, attr, None)
        if getattr(obj, "__module__", None) != mod.__name__:
            continue
        doc = inspect.getdoc(obj)
        if doc:
            parts.append(f"## {name}.{attr}\n\n{doc}\n")


def stdlib_docs_text() -> tuple[str, dict]:
    """English documentation that every machine with Python has: the docstrings of a fixed list of
    standard-library modules and their public members, in a fixed order. The text differs a
    little between Python versions, so its version and hash go into the results."""
    parts = []
    with warnings.catch_warnings():  # deprecated aliases (typing.io) warn when their docs are read
        warnings.simplefilter("ignore")
        for name in TEXT_MODULES:
            _module_docs(importlib.import_module(name), name, parts)
    text = "\n".join(parts)
    return text, dict(source="docstrings of Python standard-library modules (lcrun.eval.text.TEXT_MODULES)",
                      python=platform.python_version(), chars=len(text),
                      sha256=hashlib.sha256(text.encode()).hexdigest())
