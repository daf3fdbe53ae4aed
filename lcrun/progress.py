"""Progress bars on stderr for long work (loading weights, prefill), as progress callbacks."""
from __future__ import annotations

import sys
from typing import Any, Callable


def progress_bar(desc: str, unit: str, min_total: int = 0) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback that draws a tqdm bar on stderr. The bar is made on the
    first call, which comes with done = 0 before the work starts: it shows from then on, and its
    rate and time left count all the work. Work of fewer than ``min_total`` units draws nothing, and
    neither does a stderr that is no terminal (a log file would fill with carriage returns)."""
    from tqdm import tqdm
    state: dict[str, Any] = {}

    def progress(done: int, total: int) -> None:
        if "bar" not in state:
            # one refresh per call (a call is a chunk or a layer, never a hot loop)
            state["bar"] = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, mininterval=0,
                                miniters=1, disable=total < min_total or not stderr_is_terminal())
        bar = state["bar"]
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
    return progress


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()
