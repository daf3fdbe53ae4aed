"""The OpenAI-compatible HTTP app (Starlette): /v1/chat/completions, /v1/completions (streamed as
server-sent events or not), /v1/models, /health and /stats (lcrun's counters).

Requests are tokenized and checked against the context here, before they queue, so an over-long
prompt is a 400 that says by how much; generation runs on the Scheduler's one worker thread."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lcrun.errors import ConfigError, ContextOverflowError, LcrunError
from lcrun.runtime.sampling import SamplingParams
from lcrun.serve.prefix_store import PrefixStore
from lcrun.serve.scheduler import Job, Scheduler, Usage
from lcrun.serve.schemas import APIError, GenerationRequest, parse_request

if TYPE_CHECKING:
    from lcrun.api import LLM

log = logging.getLogger("lcrun.serve")

DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there


@dataclass
class ServeSettings:
    """What `lcrun serve` adds to the model's settings (checked here, before a model loads)."""
    model_name: str = "lcrun"
    api_key: str | None = None        # None: no authentication
    max_queue: int = 8                # requests that may wait while one generates
    max_body_bytes: int = 32 << 20
    default_max_tokens: int = 1024    # for requests without max_tokens
    context_dir: str | None = None    # the prefix cache on disk (PrefixStore); None: off
    context_min_tokens: int = 1024    # prompts this long or longer are saved there

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ConfigError(f"--max-queue must be at least 1, got {self.max_queue}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"--max-body must be at least 1KiB, got {self.max_body_bytes} bytes")
        SamplingParams(max_new_tokens=self.default_max_tokens)
        if self.context_dir is not None and not Path(self.context_dir).is_dir():
            raise ConfigError(f"--context-dir {self.context_dir} is not a folder: create it first")
        if self.context_min_tokens < 1:
            raise ConfigError(f"--context-min-tokens must be at least 1, got {self.context_min_tokens}")


def create_app(llm: "LLM", settings: ServeSettings) -> Starlette:
    """The app over a loaded LLM with a tokenizer; ``app.state.scheduler`` holds the counters."""
    scheduler = Scheduler(settings.max_queue)
    store = PrefixStore(settings.context_dir, llm, settings.context_min_tokens) if settings.context_dir else None
    created = int(time.time())

    async def guarded(request: Request, handler) -> Response:
        try:
            _authorize(request, settings.api_key)
            return await handler(request)
        except APIError as exc:
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def chat(request: Request) -> Response:
        return await guarded(request, lambda r: _generate(r, chat=True))

    async def completions(request: Request) -> Response:
        return await guarded(request, lambda r: _generate(r, chat=False))

    async def models(request: Request) -> Response:
        async def listing(_: Request) -> Response:
            return JSONResponse({"object": "list", "data": [
                {"id": settings.model_name, "object": "model", "created": created, "owned_by": "lcrun"}]})
        return await guarded(request, listing)

    async def stats(request: Request) -> Response:
        async def counters(_: Request) -> Response:
            disk = {"context_dir": {"files": len(store.saved), "loads": store.loads, "saves": store.saves}} \
                if store else {}
            return JSONResponse({**scheduler.stats(), **disk})
        return await guarded(request, counters)

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _generate(request: Request, chat: bool) -> Response:
        body = await _read_json(request, settings.max_body_bytes)
        req = parse_request(body, chat, settings.default_max_tokens)
        try:
            SamplingParams.from_kwargs(**req.sampling)
        except LcrunError as exc:
            raise APIError(400, str(exc)) from None
        ids = await run_in_threadpool(_encode, llm, req)
        kind = "chatcmpl" if chat else "cmpl"
        def run():
            if store is not None:
                store.restore(ids)
            return llm.stream_text_ids(ids, **req.sampling)

        job = Job(id=scheduler.new_id(kind), run=run, usage=lambda: _usage(llm), loop=asyncio.get_running_loop(),
                  after=(lambda usage: store.keep(usage.prompt_tokens)) if store is not None else None)
        scheduler.submit(job)
        head = {"id": job.id, "created": int(time.time()), "model": settings.model_name}
        if req.stream:
            return StreamingResponse(_sse(job, req, head), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _whole(request, job, req, head)

    async def on_http_error(_: Request, exc: HTTPException) -> Response:
        err = APIError(exc.status_code, exc.detail or "error", type="invalid_request_error")
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    async def on_error(_: Request, exc: Exception) -> Response:
        log.exception("request failed")
        err = APIError(500, f"internal error: {type(exc).__name__}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette):
        yield
        await run_in_threadpool(scheduler.close)

    app = Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
    ], exception_handlers={HTTPException: on_http_error, Exception: on_error}, lifespan=lifespan)
    app.state.scheduler = scheduler
    return app


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", type="authentication_error",
                       code="invalid_api_key")


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refused past ``limit`` bytes (413) or when it is not JSON (400)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {int(declared):,} bytes, over the limit of {limit:,} "
                       "(--max-body)", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over the limit of {limit:,} bytes (--max-body)",
                           code="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})") from None


def _encode(llm: "LLM", req: GenerationRequest) -> list[int]:
    """Token ids of the request, checked to fit the context with room for one answer token."""
    try:
        ids = llm.encode_chat(req.messages) if req.chat else llm.tokenizer.encode(req.prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        llm.generator.check_fits(len(ids))
    except ContextOverflowError as exc:
        raise APIError(400, str(exc), code="context_length_exceeded",
                       param="messages" if req.chat else "prompt") from None
    except LcrunError as exc:  # e.g. a chat template that refuses the messages
        raise APIError(400, str(exc)) from None
    return ids


def _usage(llm: "LLM") -> Usage:
    s = llm.last_stats
    return Usage(prompt_tokens=s.prompt_tokens, completion_tokens=s.new_tokens, reused_tokens=s.reused_tokens,
                 prefill_s=s.prefill_s, finish_reason="stop" if s.finish_reason == "stop" else "length")


def _choice(req: GenerationRequest, text: str | None, finish: str | None, *, delta: bool) -> dict[str, Any]:
    if not req.chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    if delta:
        return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None, "finish_reason": finish}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}


async def _whole(request: Request, job: Job, req: GenerationRequest, head: dict[str, Any]) -> Response:
    """A non-streamed answer; a client that disconnects while it waits cancels the job."""
    pieces: list[str] = []
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return Response(status_code=499)
                continue
            if kind == "text":
                pieces.append(value)
            elif kind == "error":
                raise value
            else:
                usage: Usage = value
                obj = "chat.completion" if req.chat else "text_completion"
                return JSONResponse({**head, "object": obj, "choices": [
                    _choice(req, "".join(pieces), usage.finish_reason, delta=False)], "usage": usage.to_dict()})
    finally:
        job.cancelled.set()  # a no-op once done; stops the worker if this handler was cancelled


async def _sse(job: Job, req: GenerationRequest, head: dict[str, Any]) -> AsyncIterator[str]:
    """Server-sent events: a role chunk (chat), text chunks, a finish chunk, a usage chunk
    (stream_options.include_usage), [DONE]. Closing the stream (the client left) cancels the job."""
    obj = "chat.completion.chunk" if req.chat else "text_completion"

    def event(choices: list, usage: dict | None = None) -> str:
        body = {**head, "object": obj, "choices": choices}
        if usage is not None or req.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        if req.chat:
            yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield event([_choice(req, value, None, delta=True)])
            elif kind == "error":
                yield f"data: {json.dumps(value.body())}\n\n"
                break
            else:
                yield event([_choice(req, None, value.finish_reason, delta=True)])
                if req.include_usage:
                    yield event([], value.to_dict())
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()
