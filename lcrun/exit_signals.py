"""Process-wide settings an application (the `lcrun` command) opts into; the library never does
this on its own, at import or later."""
from __future__ import annotations

import os
import signal
import threading


def exit_cleanly_on_signals() -> None:
    """Turn default-action SIGTERM/SIGHUP into SystemExit(128 + signal), so that finalizers run
    (the NVMe store's removes its KV folder; by default these signals kill Python without running
    any exit code). A handler the application installed, or an ignored signal, is kept. Only the
    main thread may set handlers: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _raise_system_exit)


def _raise_system_exit(signum, frame):
    raise SystemExit(128 + signum)  # the shell's exit status for "killed by signum"


def use_expandable_segments() -> None:
    """Under a hard --gpu-mem cap, memory the CUDA caching allocator holds in half-used segments
    counts against the cap (a 512K run on the H200 stopped with 1.43 GiB reserved but unallocated);
    expandable segments grow one mapped range instead. Must run before torch touches CUDA; a
    user's own allocator settings win."""
    if not any(os.environ.get(v) for v in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
