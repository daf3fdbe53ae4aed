"""One sequence at a time on one model: a worker thread takes jobs from a bounded queue in arrival
order and streams each one's text back to the event loop that submitted it.

The worker is the only thread that runs the model, so the cache's prefix (Generator.cached_ids)
carries from one request to the next: a request that shares a prefix with the previous one
prefills only what is new. A job whose client went away is cancelled between two decode steps."""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from lcrun.errors import LcrunError
from lcrun.serve.schemas import APIError

log = logging.getLogger("lcrun.serve")

RETRY_AFTER_S = 5  # told to clients that find the queue full


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int
    prefill_s: float
    finish_reason: str  # OpenAI's: "stop" or "length"

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.reused_tokens},
                "prefill_seconds": round(self.prefill_s, 4)}


@dataclass
class Job:
    """One request's generation: ``run`` yields its text pieces on the worker thread; ``events``
    receives ("text", str), then ("done", Usage) or ("error", APIError) on the submitting loop."""
    id: str
    run: Callable[[], Iterator[str]]
    usage: Callable[[], Usage]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    after: Callable[[Usage], None] | None = None  # on the worker, once the client has its answer

    def emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


@dataclass
class Counters:
    """What the server did, for /stats (and the tests): ``order`` lists job ids as they started."""
    completed: int = 0
    cancelled: int = 0
    rejected: int = 0   # 503: the queue was full
    failed: int = 0
    tokens_generated: int = 0
    reused_tokens: int = 0
    prefilled_tokens: int = 0
    order: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))


class Scheduler:
    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.counters = Counters()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self.running: str | None = None
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._work, name="lcrun-serve-worker", daemon=True)
        self._thread.start()

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def submit(self, job: Job) -> None:
        """Queue ``job``, or refuse it with a 503 when ``max_queue`` jobs already wait."""
        with self._lock:
            if self._waiting >= self.max_queue:
                self.counters.rejected += 1
                raise APIError(503, f"the server is busy: {self._waiting} requests are waiting (--max-queue "
                               f"{self.max_queue}); retry later", type="server_busy",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
            self._waiting += 1
        self._queue.put(job)

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {"queued": self._waiting, "running": self.running, "completed": c.completed, "cancelled": c.cancelled,
                "rejected": c.rejected, "failed": c.failed, "tokens_generated": c.tokens_generated,
                "prefilled_tokens": c.prefilled_tokens, "reused_tokens": c.reused_tokens, "order": list(c.order)}

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
                self.running = job.id
            try:
                self._run(job)
            finally:
                self.running = None

    def _run(self, job: Job) -> None:
        c = self.counters
        if job.cancelled.is_set():  # its client left while it waited
            c.cancelled += 1
            return
        c.order.append(job.id)
        pieces = job.run()
        try:
            for piece in pieces:
                if job.cancelled.is_set():
                    break
                job.emit("text", piece)
        except LcrunError as exc:
            c.failed += 1
            job.emit("error", APIError(400, str(exc)))
            return
        except Exception as exc:  # never take the worker down: the client gets a 500, the log the traceback
            log.exception("generation %s failed", job.id)
            c.failed += 1
            job.emit("error", APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))
            return
        finally:
            pieces.close()  # a cancelled job stops here: the cache keeps the tokens decoded so far
        usage = job.usage()
        c.tokens_generated += usage.completion_tokens
        c.reused_tokens += usage.reused_tokens
        c.prefilled_tokens += usage.prompt_tokens - usage.reused_tokens
        if job.cancelled.is_set():
            c.cancelled += 1
            log.info("%s cancelled after %d tokens", job.id, usage.completion_tokens)
            return
        c.completed += 1
        job.emit("done", usage)
        if job.after is not None:
            job.after(usage)
