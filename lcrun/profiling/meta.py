"""Who measured what, where: run metadata shared by bench and profile JSON (and perf/ scripts)."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path


def git_commit() -> str:
    """The checkout's commit (``git rev-parse HEAD``), or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_dirty() -> bool | None:
    """True when tracked files differ from the commit (numbers then belong to uncommitted code)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=10)
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def command_line() -> str:
    """The command as a user would type it (``python -m lcrun.cli bench ...`` is ``lcrun bench ...``)."""
    program = Path(sys.argv[0])
    name = "lcrun" if program.name == "cli.py" and program.parent.name == "lcrun" else program.name
    return shlex.join([name] + sys.argv[1:])


def run_metadata() -> dict:
    import torch
    # LCRUN_COMMIT: the commit of a tree copied without its history (a device run of a checkout).
    commit = os.environ.get("LCRUN_COMMIT")
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command_line(),
            "commit": commit or git_commit(), "dirty": False if commit else git_dirty(),
            "python": platform.python_version(),
            "torch": torch.__version__, "host": platform.node()}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        meta["gpu"] = props.name
        meta["gpu_memory_bytes"] = props.total_memory
        meta["cuda"] = torch.version.cuda
    else:
        meta["gpu"] = None
    return meta


def gpu_slug(meta: dict) -> str:
    return (meta.get("gpu") or "cpu").replace("NVIDIA ", "").replace(" ", "-").lower()
