"""OpenAI request bodies, checked: a request lcrun cannot honour exactly is refused (APIError), never
half-ignored. Plain Python, no web framework: the app turns an APIError into an OpenAI error body."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class APIError(Exception):
    """An OpenAI-style error: HTTP status, message, type and the offending parameter."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Fields accepted as they are (metadata that changes nothing), by endpoint.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
           "n", "user", "repetition_penalty", "presence_penalty", "frequency_penalty", "logprobs"}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                   "parallel_tool_calls", "functions", "function_call", "response_format", "logit_bias"}
_COMPLETION = _COMMON | {"prompt", "echo", "suffix", "best_of", "logit_bias"}
# Features lcrun does not implement: present with a non-default value, they are refused.
_UNSUPPORTED_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,), "suffix": ("",),
    "tools": ([],), "tool_choice": ("none",), "parallel_tool_calls": (False,), "functions": ([],),
    "function_call": ("none",), "logit_bias": ({},)}


@dataclass
class GenerationRequest:
    """A checked request: either chat ``messages`` or a completion ``prompt``, and its sampling."""
    stream: bool
    include_usage: bool
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams keyword arguments
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None

    @property
    def chat(self) -> bool:
        return self.messages is not None


def parse_request(body: Any, chat: bool, default_max_tokens: int) -> GenerationRequest:
    """The JSON body of /v1/chat/completions (``chat``) or /v1/completions -> GenerationRequest."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    known = _CHAT if chat else _COMPLETION
    unknown = sorted(set(body) - known)
    if unknown:
        raise APIError(400, f"unsupported field(s): {', '.join(unknown)}", param=unknown[0])
    for name, defaults in _UNSUPPORTED_DEFAULTS.items():
        if name in body and body[name] is not None and body[name] not in defaults:
            raise APIError(400, f"{name}={body[name]!r} is not supported by lcrun (one sequence, text only)",
                           param=name, code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise APIError(400, "response_format other than {\"type\": \"text\"} is not supported", param="response_format",
                       code="unsupported_parameter")
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise APIError(400, "stream_options needs stream: true", param="stream_options")
    options = options or {}
    if set(options) - {"include_usage"}:
        raise APIError(400, f"unsupported stream_options: {', '.join(sorted(set(options) - {'include_usage'}))}",
                       param="stream_options")
    include_usage = _typed(options, "include_usage", bool, False)
    req = GenerationRequest(stream=stream, include_usage=include_usage, sampling=_sampling(body, default_max_tokens))
    if chat:
        req.messages = _messages(body.get("messages"))
    else:
        req.prompt = _prompt(body.get("prompt"))
    return req


def _typed(body: dict, name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise APIError(400, f"{name} must be {kind.__name__ if kind is not dict else 'an object'}, got {value!r}",
                       param=name)
    return value


def _sampling(body: dict, default_max_tokens: int) -> dict[str, Any]:
    """The SamplingParams keyword arguments of a request (ranges are SamplingParams' to check)."""
    out: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    out["max_new_tokens"] = default_max_tokens if max_tokens is None else max_tokens
    for name in ("temperature", "top_p", "top_k", "seed", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):
        if body.get(name) is not None:
            out[name] = body[name]
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
            raise APIError(400, "stop must be a non-empty string or a list of at most 4 of them", param="stop")
        if stops:
            out["stop"] = tuple(stops)
    return out


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}] needs a role of system, user or assistant (tools are not supported)",
                           param="messages")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise APIError(400, f"messages[{i}]: unsupported field(s) {', '.join(sorted(extra))}", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(m.get("content"), i)})
    return out


def _content(content: Any, i: int) -> str:
    """A message's text: a string, or a list of text parts (images and audio are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
        return "".join(p["text"] for p in content)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "prompt must be one string (batches and token-id prompts are not supported)",
                       param="prompt")
    return prompt
