"""Long-context quality: synthetic retrieval tasks by length and depth, dense vs top-k, and a
teacher-forced fidelity test of the top-k decode path against the dense one on a real text.

    lcrun eval --tasks passkey,niah_single --lengths 1k,4k --modes dense,topk --trials 20

Modes: ``auto`` (what `lcrun run` picks); ``dense``; ``topk`` (positions auto: true inside the
trained window, window beyond); ``topk:true`` / ``topk:window`` force one. Greedy decoding,
plain completion (see lcrun.eval.tasks). One model load serves every cell; each cell gets the
cache `lcrun run` would build for its length, from the run's settings. The JSON file is
rewritten after every cell, so a run stopped by its time limit keeps what it measured.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lcrun.construct import build_cache, cpu_ignored_settings, resolve_device, resolve_dtype, resolve_positions
from lcrun.config import LcrunConfig
from lcrun.errors import ConfigError
from lcrun.eval.tasks import TASKS, TaskSet, grade
from lcrun.eval.text import stdlib_docs_text
from lcrun.profiling.meta import run_metadata
from lcrun.runtime.build import load_model
from lcrun.runtime.generate import Generator
from lcrun.runtime.loading import default_model, open_source
from lcrun.runtime.sampling import SamplingParams
from lcrun.runtime.synthetic import is_synthetic

K = 1024
PER_CELL = ("ctx", "attention", "positions")  # set by each cell's length and mode, not by the run
_LENGTH_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")
Log = Callable[[str], None]


def parse_length(text: str) -> int:
    """'4k', '7.3k', '1M', '8192' -> tokens (k = 1024, M = 1024**2), rounded to a whole token."""
    m = _LENGTH_RE.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"length {text!r}: use tokens like 8192, 4k, 7.3k or 1M")
    return int(round(float(m.group(1)) * {"": 1, "k": K, "m": K * K}[m.group(2).lower()]))


@dataclass(frozen=True)
class Mode:
    name: str          # as given: auto (the default path), dense, topk, topk:true, topk:window
    attention: str
    positions: str

    @classmethod
    def parse(cls, text: str) -> "Mode":
        attention, _, positions = text.partition(":")
        if attention not in ("auto", "dense", "topk") or positions not in ("", "auto", "true", "window"):
            raise ConfigError(f"mode {text!r}: use auto, dense, topk, topk:true or topk:window")
        return cls(text, attention, positions or "auto")


@dataclass(frozen=True)
class Cell:
    """Retrieval trials of one task at one length, in each of ``modes``."""
    task: str
    length: str
    modes: tuple[str, ...]
    trials: int


@dataclass(frozen=True)
class FidelityRun:
    length: str
    steps: int
    mode: str


@dataclass(frozen=True)
class Suite:
    """What one eval measures, most important first (a time limit drops the tail). The fidelity
    runs come before ``cells[fidelity_at]`` (default: after every cell)."""
    cells: tuple[Cell, ...]
    fidelity: tuple[FidelityRun, ...] = ()
    fidelity_at: int | None = None

    @classmethod
    def grid(cls, tasks: list[str], lengths: list[str], modes: list[str], trials: int,
             fidelity_lengths: list[str] = (), fidelity_steps: int = 512) -> "Suite":
        """Every task x length in every mode; fidelity at each length for each non-dense mode."""
        cells = tuple(Cell(t, n, tuple(modes), trials) for t in tasks for n in lengths)
        fid = tuple(FidelityRun(n, fidelity_steps, m) for n in fidelity_lengths for m in modes if m != "dense")
        return cls(cells, fid)

    @classmethod
    def from_json(cls, doc: dict) -> "Suite":
        """A suite written as JSON: {"cells": [{"task", "length", "modes", "trials"}, ...],
        "fidelity": [{"length", "steps", "mode"}, ...], "fidelity_at": N} (the last two optional)."""
        try:
            return cls(tuple(Cell(c["task"], str(c["length"]), tuple(c["modes"]), int(c["trials"])) for c in doc["cells"]),
                       tuple(FidelityRun(str(f["length"]), int(f["steps"]), f["mode"]) for f in doc.get("fidelity", ())),
                       doc.get("fidelity_at"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"a suite needs cells of task, length, modes and trials, and fidelity runs of "
                              f"length, steps and mode ({type(exc).__name__}: {exc})") from None

    def check(self) -> None:
        """Every name and number, before the model loads: a typo should not cost a load."""
        for c in self.cells:
            if c.task not in TASKS:
                raise ConfigError(f"unknown task {c.task!r}; known: {', '.join(TASKS)}")
            if c.trials < 1:
                raise ConfigError(f"--trials must be at least 1, got {c.trials}")
            parse_length(c.length)
            for m in c.modes:
                Mode.parse(m)
        for f in self.fidelity:
            if not 1 <= f.steps < parse_length(f.length):
                raise ConfigError(f"--fidelity-steps must be at least 1 and below the length {f.length}, "
                                  f"got {f.steps}")
            Mode.parse(f.mode)


class Evaluator:
    """One loaded model and the settings every cell shares; each cell's cache is the one `lcrun
    run` would build for its length and mode (planned under --gpu-mem/--host-mem/--kv-dir)."""

    def __init__(self, config: LcrunConfig, log: Log = lambda _m: None):
        self.config = dataclasses.replace(config, model=config.model or default_model())
        self.device = resolve_device(self.config.device)
        self.dtype = resolve_dtype(self.config.dtype, self.device)
        self.spec = self.config.model
        if is_synthetic(self.spec):
            raise ConfigError(f"{self.spec} has random weights and no tokenizer: evaluate a real model")
        if self.device.type == "cpu" and cpu_ignored_settings(self.config):
            log(f"warning: {cpu_ignored_settings(self.config)}")
        t0 = time.perf_counter()
        source = open_source(self.spec)
        self.tok = source.tokenizer()
        self.model = load_model(source, self.device, self.dtype)
        self.load_s = round(time.perf_counter() - t0, 2)
        bos = self.tok.token_id(self.tok.bos_token) if self.tok.bos_token else None
        self.tasks = TaskSet(self.tok, bos=[] if bos is None else [bos], seed=self.config.seed)
        self._cache = None

    @property
    def settings(self) -> dict:
        """The run's settings, for results files (the per-cell ones are in each cell)."""
        return {k: v for k, v in self.config.to_header().items() if k not in PER_CELL + ("ctx_tokens",)}

    def cell_config(self, mode: Mode, ctx: int) -> LcrunConfig:
        return dataclasses.replace(self.config, ctx=ctx, attention=mode.attention, positions=mode.positions)

    def generator(self, mode: Mode, ctx: int) -> tuple[Generator, str]:
        """A generator over the cache `lcrun run` would build, and its positions: "true", or
        "window" when queries may move (past the trained window, or from the start with topk:window)."""
        if self._cache is not None and hasattr(self._cache, "close"):
            self._cache.close()  # the previous cell's pinned host pool and page files
        cache, _, config = build_cache(self.cell_config(mode, ctx), self.model.cfg, self.device, self.dtype)
        self._cache = cache
        rule = resolve_positions(config, self.model.cfg)
        return Generator(self.model, cache, config.prefill_chunk), "window" if rule.may_move else "true"

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # -- retrieval tasks ------------------------------------------------------------------------
    def run_cell(self, task: str, length: int, mode: Mode, trials: int, deadline: float | None = None,
                 on_trial: Callable[[dict], None] | None = None) -> dict:
        """on_trial: called with the cell so far after every trial (the caller saves it, so a run
        killed mid-cell keeps the trials it finished)."""
        samples = self.tasks.cell(task, length, trials)
        gen, positions = self.generator(mode, length + max(s.max_new_tokens for s in samples) + 8)
        records = []

        def cell() -> dict:
            return summarise(dict(task=task, length=length, mode=mode.name, attention=mode.attention,
                                  positions=positions, trials_requested=trials, records=list(records)))
        before = tier_counts(gen.cache.report())
        for s in samples:
            if deadline is not None and time.perf_counter() > deadline:
                break
            gen.reset()
            t0 = time.perf_counter()
            out_ids = list(gen.stream(s.prompt_ids, SamplingParams(max_new_tokens=s.max_new_tokens), self.tok.stop_ids))
            self._sync()
            text = self.tok.decode(out_ids)
            record = dict(depth=s.depth, score=grade(s, text), output=text, answers=s.answers,
                          needle_token=s.needle_token, prefill_s=round(gen.last_stats.prefill_s, 3),
                          total_s=round(time.perf_counter() - t0, 3))
            after = tier_counts(gen.cache.report())
            if after:  # what this trial's decode steps met in the tiers (a skipped page can change the answer)
                record["tiers"] = {k: round(after[k] - before[k], 3) for k in after}
            before = after
            records.append(record)
            if on_trial is not None:
                on_trial(cell())
        del gen
        self._free()
        return cell()

    # -- teacher-forced fidelity -----------------------------------------------------------------
    def fidelity(self, ids: list[int], length: int, steps: int, mode: Mode) -> dict:
        """Logits of the last ``steps`` tokens of ids[:length]: the dense path (chunked prefill,
        exact) against ``mode``'s decode path, one token at a time with the true previous token."""
        if length > len(ids) or steps >= length:
            raise ConfigError(f"fidelity needs {length} tokens of text and steps < length")
        n0 = length - steps
        ref = self._dense_logits(ids, n0, length)
        gen, positions = self.generator(mode, length + 8)
        t0 = time.perf_counter()
        first = gen.prefill(ids[:n0])
        rows = [first.float()]
        with torch.inference_mode():
            for i in range(n0, length - 1):
                # clone: a replayed CUDA graph returns the same output buffer every step
                rows.append(gen.stepper.step(torch.tensor([ids[i]], device=self.device)).float().clone())
        self._sync()
        decode_s = time.perf_counter() - t0
        got = torch.stack(rows)
        del gen
        self._free()
        targets = torch.tensor(ids[n0:length], device=self.device)
        ref_lp, got_lp = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
        kl = (ref_lp.exp() * (ref_lp - got_lp)).sum(-1)
        return dict(length=length, steps=steps, mode=mode.name, positions=positions,
                    top1_agreement=(ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
                    mean_kl=kl.mean().item(), max_kl=kl.max().item(),
                    nll_dense=-ref_lp.gather(1, targets[:, None]).mean().item(),
                    nll_mode=-got_lp.gather(1, targets[:, None]).mean().item(), seconds=round(decode_s, 2))

    def _dense_logits(self, ids: list[int], n0: int, length: int) -> torch.Tensor:
        gen, _ = self.generator(Mode.parse("dense"), length + 8)
        first = gen.prefill(ids[:n0])
        rest = self.model.forward(torch.tensor(ids[n0:length - 1], device=self.device), gen.cache, all_logits=True)
        out = torch.cat([first[None].float(), rest.float()])
        del gen
        self._free()
        return out

    def _free(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


TIER_COUNTS = ("late_pages", "skipped_pages", "redone_steps")


def tier_counts(report: dict) -> dict[str, float]:
    """A tiered cache's cumulative counters that can change an answer or its time: NVMe pages that
    arrived late, late pages skipped, steps run again, and milliseconds waited for them."""
    if "late_pages" not in report:
        return {}
    return {**{k: report[k] for k in TIER_COUNTS},
            "nvme_wait_ms": report["nvme_wait_ms_per_token"] * max(1, report["decode_steps"])}


def summarise(cell: dict) -> dict:
    recs = cell["records"]
    cell["trials"] = len(recs)
    cell["accuracy"] = round(sum(r["score"] for r in recs) / len(recs), 4) if recs else None
    by_depth: dict[str, list[float]] = {}
    for r in recs:
        by_depth.setdefault(f"{r['depth']:.1f}", []).append(r["score"])
    cell["by_depth"] = {d: round(sum(v) / len(v), 4) for d, v in sorted(by_depth.items())}
    if recs:
        cell["median_prefill_s"] = sorted(r["prefill_s"] for r in recs)[len(recs) // 2]
    return cell


@dataclass
class _Run:
    """One eval in progress: its results document, saved to ``out`` after every measurement."""
    ev: Evaluator
    out: Path
    result: dict
    deadline: float | None
    log: Log
    text_ids: list[int] = field(default_factory=list)

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.result, indent=1))

    def late(self, label: str) -> bool:
        if self.deadline is not None and time.perf_counter() > self.deadline:
            self.result["skipped"].append(label)
            return True
        return False

    def fidelity(self, f: FidelityRun) -> None:
        label = f"fidelity {f.length} {f.mode}"
        if self.late(label):
            return
        if not self.text_ids:
            text, text_meta = stdlib_docs_text()
            self.text_ids.extend(self.ev.tok.encode(text, add_special_tokens=False))
            self.result["fidelity_text"] = dict(text_meta, tokens=len(self.text_ids))
        r = self.ev.fidelity(self.text_ids, parse_length(f.length), f.steps, Mode.parse(f.mode))
        self.result["fidelity"].append(r)
        self.log(f"{label} [{r['positions']}]: top-1 agreement {r['top1_agreement']:.4f}, mean KL {r['mean_kl']:.5f}")
        self.save()

    def cell(self, c: Cell, mode: str) -> None:
        label = f"{c.task} {c.length} {mode}"
        if self.late(label):
            return

        def partial(cell: dict) -> None:
            self.result["unfinished_cell"] = cell
            self.save()
        cell = self.ev.run_cell(c.task, parse_length(c.length), Mode.parse(mode), c.trials, self.deadline, partial)
        self.result.pop("unfinished_cell", None)
        self.result["cells"].append(cell)
        self.log(f"{label} [{cell['positions']}]: accuracy {cell['accuracy']} over {cell['trials']} trials, "
                 f"median prefill {cell.get('median_prefill_s')} s")
        self.save()


def run_eval(ev: Evaluator, suite: Suite, out: Path, time_limit: float | None = None,
             log: Log = lambda _m: None) -> dict:
    """Every measurement of ``suite`` on ``ev``'s model and settings, written to ``out`` as it
    goes; the results document is returned. ``time_limit``: seconds from now."""
    suite.check()
    t_start = time.perf_counter()
    result = dict(meta=dict(run_metadata(), load_s=ev.load_s), model=ev.spec,
                  trained_window=ev.model.cfg.max_position_embeddings,
                  settings=dict(ev.settings, dtype=str(ev.dtype).replace("torch.", ""), device=str(ev.device),
                                decoding="greedy", prompt="plain completion (lcrun.eval.tasks)"),
                  suite=dataclasses.asdict(suite), cells=[], fidelity=[], skipped=[])
    run = _Run(ev, out, result, t_start + time_limit if time_limit else None, log)
    fidelity_at = len(suite.cells) if suite.fidelity_at is None else suite.fidelity_at
    for index, c in enumerate(suite.cells):
        if index == fidelity_at:
            for f in suite.fidelity:
                run.fidelity(f)
        for m in c.modes:
            run.cell(c, m)
    if fidelity_at >= len(suite.cells):
        for f in suite.fidelity:
            run.fidelity(f)
    result["meta"]["total_s"] = round(time.perf_counter() - t_start, 1)
    run.save()
    return result


def markdown_table(result: dict) -> str:
    """Task x length rows, dense vs top-k columns (accuracy, trials), from one results file."""
    rows: dict[tuple[str, int], dict[str, str]] = {}
    for c in result["cells"]:
        col = "dense" if c["attention"] == "dense" else f"top-k ({c['positions']} positions)"
        acc = "-" if c["accuracy"] is None else f"{c['accuracy']:.2f}"
        rows.setdefault((c["task"], c["length"]), {})[col] = f"{acc} ({c['trials']})"
    cols = ["dense", "top-k (true positions)", "top-k (window positions)"]
    lines = ["| task | length | " + " | ".join(cols) + " |", "| --- | --- |" + " --- |" * len(cols)]
    for (task, length), v in sorted(rows.items(), key=lambda kv: (TASKS.index(kv[0][0]), kv[0][1])):
        lines.append(f"| {task} | {_fmt_len(length)} | " + " | ".join(v.get(c, "") for c in cols) + " |")
    return "\n".join(lines)


def _fmt_len(n: int) -> str:
    if n >= K * K and n % (K * K) == 0:
        return f"{n // (K * K)}M"
    return f"{n / K:.1f}K".replace(".0K", "K")
