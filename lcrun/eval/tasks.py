"""Seeded synthetic long-context tasks, built directly as token ids of an exact length.

passkey      Mohtashami & Jaggi (2023): a 5-digit pass key hidden in repeated filler sentences.
niah_single  RULER-style needle in a haystack: "One of the special magic numbers for KEY is: VALUE."
niah_multikey    the same with 3 distractor needles of other keys; the question names one key.
niah_multivalue  4 needles with the same key and different values; all must be recalled.

Every task is plain completion (no chat template): the prompt ends with the start of the answer
("The pass key is"), which is what gives the 135M demo model a usable dense baseline inside its
trained window. The haystack is RULER's "noise" haystack (the passkey filler sentences); the
needle sits at the requested depth (0 = right after the instruction, 1 = right before the
question), snapped to a sentence boundary. Prompts are built by concatenating the token ids of
whole pieces, so a length of 1M tokens costs one tokenisation of each piece.

Grading is substring match of the expected value(s) in the generated text; multi-value scores
the fraction of values recalled (RULER's string_match_all).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Protocol

from lcrun.errors import ConfigError

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                 "I will quiz you about the important information there.\n\n")
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.\n\n")
# Needle keys: RULER draws words; a fixed list keeps prompts reproducible without a word list file.
KEY_WORDS = ["amber-harbor", "silent-meadow", "copper-lantern", "frosty-orchard", "velvet-canyon",
             "hollow-summit", "crimson-pebble", "gentle-thunder", "rusty-compass", "ivory-falcon",
             "misty-quarry", "golden-ember", "brisk-willow", "scarlet-ridge", "quiet-glacier",
             "lunar-thicket", "marble-fjord", "sable-prairie", "dusty-beacon", "cobalt-heron"]
TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue")


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


@dataclass
class Sample:
    task: str
    length: int                 # tokens in prompt_ids
    depth: float                # requested depth of the (asked) needle, 0..1
    prompt_ids: list[int]
    answers: list[str]          # every one must appear for full credit
    needle_token: int           # index in prompt_ids where the asked needle starts
    max_new_tokens: int
    meta: dict = field(default_factory=dict)


def grade(sample: Sample, output: str) -> float:
    """Fraction of expected values found verbatim in ``output`` (1.0 or 0.0 for one value)."""
    return sum(a in output for a in sample.answers) / len(sample.answers)


def depths(trials: int, steps: int = 11) -> list[float]:
    """Depths swept 0..100% in ``steps`` evenly spaced values, cycled over the trials."""
    return [(i % steps) / (steps - 1) for i in range(trials)]


class _Builder:
    """Token pieces of one tokenizer, tokenised once each."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.tok.encode(text, add_special_tokens=False)
        return self.cache[text]

    def assemble(self, length: int, intro: str, needles: list[tuple[float, str]], question: str,
                 bos: list[int]) -> tuple[list[int], list[int]]:
        """Prompt of exactly ``length`` tokens: bos + intro + noise with needles at their depths +
        question. Returns (ids, start index of each needle, in the order given)."""
        head = bos + self.ids(intro)
        tail = self.ids(question)
        needle_ids = [self.ids(text) for _, text in needles]
        room = length - len(head) - len(tail) - sum(map(len, needle_ids))
        unit = self.ids(NOISE)
        if room < len(unit):
            raise ConfigError(f"length {length} leaves no room for the haystack (needs > {length - room + len(unit)})")
        # Noise of exactly `room` tokens: whole lines, the first one cut to fit (so every needle
        # position, the end included, can sit on a line boundary).
        reps = -(-room // len(unit))
        noise = (unit * reps)[len(unit) * reps - room:]
        order = sorted(range(len(needles)), key=lambda i: needles[i][0])
        ids, at, starts = list(head), 0, [0] * len(needles)
        for i in order:
            # Snap to a line boundary of the noise so no sentence is split by the needle.
            cut = max(0, room - round((1 - needles[i][0]) * room / len(unit)) * len(unit))
            cut = max(cut, at)
            ids += noise[at:cut]
            at = cut
            starts[i] = len(ids)
            ids += needle_ids[i]
        ids += noise[at:] + tail
        assert len(ids) == length
        return ids, starts


def _rng(seed: int, task: str, length: int, trial: int) -> random.Random:
    return random.Random(f"{seed}/{task}/{length}/{trial}")


def passkey(b: _Builder, length: int, depth: float, rng: random.Random, bos: list[int]) -> Sample:
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    ids, starts = b.assemble(length, PASSKEY_INTRO, [(depth, needle)], "\nWhat is the pass key? The pass key is", bos)
    return Sample("passkey", length, depth, ids, [key], starts[0], 8)


def _value(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _niah_question(key: str, plural: bool) -> str:
    if plural:
        return (f"\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
                f"The special magic numbers for {key} mentioned in the provided text are")
    return (f"\nWhat is the special magic number for {key} mentioned in the provided text? "
            f"The special magic number for {key} mentioned in the provided text is")


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}.\n"


def niah_single(b, length, depth, rng, bos) -> Sample:
    key, value = rng.choice(KEY_WORDS), _value(rng)
    ids, starts = b.assemble(length, NIAH_INTRO, [(depth, _needle(key, value))], _niah_question(key, False), bos)
    return Sample("niah_single", length, depth, ids, [value], starts[0], 12, {"key": key})


def niah_multikey(b, length, depth, rng, bos, distractors: int = 3) -> Sample:
    keys = rng.sample(KEY_WORDS, 1 + distractors)
    values = [_value(rng) for _ in keys]
    needles = [(depth, _needle(keys[0], values[0]))] + [(rng.random(), _needle(k, v)) for k, v in zip(keys[1:], values[1:])]
    ids, starts = b.assemble(length, NIAH_INTRO, needles, _niah_question(keys[0], False), bos)
    return Sample("niah_multikey", length, depth, ids, [values[0]], starts[0], 12,
                  {"key": keys[0], "distractors": values[1:]})


def niah_multivalue(b, length, depth, rng, bos, values: int = 4) -> Sample:
    key = rng.choice(KEY_WORDS)
    vals = [_value(rng) for _ in range(values)]
    # The first value at the requested depth, the others spread at random depths.
    needles = [(depth, _needle(key, vals[0]))] + [(rng.random(), _needle(key, v)) for v in vals[1:]]
    ids, starts = b.assemble(length, NIAH_INTRO, needles, _niah_question(key, True), bos)
    return Sample("niah_multivalue", length, depth, ids, vals, starts[0], 40, {"key": key})


_MAKERS: dict[str, Callable[..., Sample]] = {"passkey": passkey, "niah_single": niah_single,
                                             "niah_multikey": niah_multikey, "niah_multivalue": niah_multivalue}


class TaskSet:
    """Samples of every task for one tokenizer. bos: token ids to start each prompt with."""

    def __init__(self, tok: Tokenizer, bos: list[int] | None = None, seed: int = 0):
        self.builder = _Builder(tok)
        self.bos = list(bos or [])
        self.seed = seed

    def sample(self, task: str, length: int, trial: int, depth: float) -> Sample:
        if task not in _MAKERS:
            raise ConfigError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        return _MAKERS[task](self.builder, length, depth, _rng(self.seed, task, length, trial), self.bos)

    def cell(self, task: str, length: int, trials: int) -> list[Sample]:
        """``trials`` samples at one length, depths swept 0..100%."""
        return [self.sample(task, length, i, d) for i, d in enumerate(depths(trials))]
