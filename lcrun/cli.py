"""The `lcrun` command: chat, run, models. Options come from LcrunConfig's fields."""
from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import click

from lcrun.config import DEFAULT_MAX_NEW_TOKENS, LcrunConfig
from lcrun.errors import ContextOverflowError, LcrunError
from lcrun.planner.gpus import GPU_PROFILES


def config_options(func: Callable | None = None, *, exclude: tuple[str, ...] = ()) -> Callable:
    """Add one click option per LcrunConfig field but ``exclude`` (fields the command sets itself);
    the command receives ``config=LcrunConfig``."""
    if func is None:
        return functools.partial(config_options, exclude=exclude)
    fields = [f for f in LcrunConfig.cli_fields() if f.name not in exclude]

    @functools.wraps(func)
    @handle_errors  # a bad setting fails as the config is made: one line, as any other error
    def wrapper(**kwargs: Any):
        settings = {f.name: kwargs.pop(f.name) for f in fields}
        settings = {k: v for k, v in settings.items() if v is not None or k == "model"}
        kwargs["config"] = LcrunConfig(**settings)
        return func(**kwargs)

    for f in reversed(fields):
        flag = "--" + f.name.replace("_", "-")
        choices = f.metadata.get("choices")
        default = f.default if f.default is not dataclasses.MISSING else None
        if choices and all(isinstance(c, int) for c in choices):
            ftype: Any = click.Choice([str(c) for c in choices])
            wrapper = _int_choice(f.name, wrapper)
        elif choices:
            ftype = click.Choice(choices)
        else:
            ftype = int if isinstance(default, int) and not isinstance(default, bool) else str
        wrapper = click.option(flag, f.name, type=ftype, default=None if default is None else str(default)
                               if isinstance(ftype, click.Choice) else default,
                               show_default=default is not None, help=f.metadata["help"])(wrapper)
    return wrapper


def _int_choice(name: str, func: Callable) -> Callable:
    @functools.wraps(func)
    def wrapper(**kwargs: Any):
        if kwargs.get(name) is not None:
            kwargs[name] = int(kwargs[name])
        return func(**kwargs)
    return wrapper


def sampling_options(func: Callable) -> Callable:
    options = [
        click.option("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, show_default=True, help="Most tokens per reply."),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass."),
        click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the k likeliest; 0 = off."),
        click.option("--stop", multiple=True, metavar="TEXT",
                     help="End the reply before this text (repeatable); the text itself is not printed."),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True,
                     help="Discourage tokens already in the prompt or reply (above 1 = less repetition; 1 = off)."),
        click.option("--presence-penalty", type=float, default=0.0, show_default=True,
                     help="Subtract from tokens already in the reply, -2 to 2 (0 = off)."),
        click.option("--frequency-penalty", type=float, default=0.0, show_default=True,
                     help="Subtract per earlier use in the reply, -2 to 2 (0 = off)."),
    ]
    for opt in reversed(options):
        func = opt(func)
    return func


EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT (Ctrl+C)


def handle_errors(func: Callable) -> Callable:
    """User errors print one line and exit 1; Ctrl+C exits 130 (128 + SIGINT); no traceback."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return func(*args, **kwargs)
        except LcrunError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
    return wrapper


def info(message: str) -> None:
    click.secho(message, fg="cyan", err=True)


def warn(message: str) -> None:
    click.secho(f"warning: {message}", fg="yellow", err=True)


class _LibraryLog(logging.Handler):
    """The library's log records (lcrun.*) as the CLI's own lines: info in cyan, warnings in yellow."""

    def emit(self, record: logging.LogRecord) -> None:
        (info if record.levelno < logging.WARNING else warn)(record.getMessage())


def _show_library_log() -> None:
    logger = logging.getLogger("lcrun")
    if not any(isinstance(h, _LibraryLog) for h in logger.handlers):
        logger.addHandler(_LibraryLog())
        logger.setLevel(logging.INFO)


def show_attention(choice) -> None:
    """The resolved --attention and why, one line on stderr (and its warning, one more)."""
    info(choice.line())
    if choice.warning:
        warn(choice.warning)


def _positions_line(llm) -> str:
    window = llm.model_config.max_position_embeddings
    moves_at = llm.positions.trained_window  # a PositionRule (lcrun.runtime.positions)
    if llm.attention == "dense" or moves_at is None:
        return f"positions: true (real positions; the trained window is {window:,} tokens)"
    if moves_at == 0:
        return f"positions: window (attended tokens kept inside the trained window of {window:,} tokens)"
    return f"positions: true up to the trained window of {moves_at:,} tokens, window positions past it"


def _need_text_model(config: LcrunConfig, command: str) -> None:
    """run and chat take text: a synthetic model (random weights, no tokenizer) is refused before loading."""
    from lcrun.runtime.synthetic import is_synthetic
    if config.model is not None and is_synthetic(config.model):
        ids = "give token ids with --prompt-ids, or " if command == "run" else ""
        raise LcrunError(f"{config.model} has random weights and no tokenizer, so `lcrun {command}` cannot take "
                         f"text: {ids}measure it with `lcrun bench --model {config.model}` (or `lcrun profile`)")


def load_llm(config: LcrunConfig, context: Path | None = None):
    """The LLM for ``config``, its choices on stderr; ``context``: a saved context to restore into it."""
    from lcrun.api import LLM
    from lcrun.errors import IgnoredSettingWarning, TrainedWindowWarning
    from lcrun.runtime.loading import default_model

    if config.model is None:
        config = dataclasses.replace(config, model=default_model())
        info(f"no --model given: using the built-in demo model {config.model}")
    info(f"context: {config.ctx_tokens} tokens ({config.ctx})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainedWindowWarning)  # shown below as one line
        warnings.simplefilter("ignore", IgnoredSettingWarning)  # likewise
        llm = LLM(config=config)
    if llm.settings_warning:
        warn(llm.settings_warning)
    show_attention(llm.attention_choice)
    info(f"loaded {llm.model_config.name}, {llm.model_config.num_layers} layers, on {llm.device} "
         f"({str(llm.dtype).replace('torch.', '')})")
    info(_positions_line(llm))
    if context is not None:
        start = time.perf_counter()
        header = llm.load_context(str(context))
        info(f"restored {header['tokens']:,} tokens from {context} in {time.perf_counter() - start:.2f} s")
    return llm


def context_option(func: Callable) -> Callable:
    return click.option("--context", "context", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="Start from this saved context (--save-context): its tokens are not prefilled "
                             "again.")(func)


def _check_context(path: Path | None) -> dict[str, Any] | None:
    """A --context file's header, read before the model loads so a missing or foreign file fails fast
    (the full check, against the model and cache, comes with the load)."""
    if path is None:
        return None
    from lcrun.runtime.context_file import read_header
    return read_header(path)


def _check_save_path(path: Path | None) -> None:
    """--save-context: its folder must exist, found before the model loads rather than after the reply."""
    if path is not None and not path.parent.is_dir():
        raise LcrunError(f"--save-context {path}: the folder {path.parent} does not exist: create it first")


@click.group()
@click.version_option(package_name="lcrun")
def main() -> None:
    """lcrun: long-context LLM inference on one consumer GPU."""
    from lcrun.exit_signals import exit_cleanly_on_signals, use_expandable_segments
    use_expandable_segments()
    exit_cleanly_on_signals()
    _show_library_log()


def _sampling(**sampling: Any) -> dict[str, Any]:
    """The sampling flags (sampling_options), checked (SamplingParams) before any model is loaded."""
    from lcrun.runtime.sampling import SamplingParams
    SamplingParams.from_kwargs(**sampling)
    return sampling


PREFILL_BAR_MIN_TOKENS = 1024  # shorter prefills take about a second on a CPU: no bar
CHAT_HELP = "commands: /clear forgets the conversation, /exit quits, /help shows this; Ctrl+C stops a reply"


@main.command()
@config_options
@sampling_options
@click.option("--system", default=None, help="System prompt.")
@context_option
@handle_errors
def chat(config: LcrunConfig, system: str | None, context: Path | None, **sampling_kw: Any) -> None:
    """Chat with a model. Reads one message per line when stdin is not a terminal."""
    sampling = _sampling(**sampling_kw)
    _need_text_model(config, "chat")
    saved = _saved_conversation(context, _check_context(context))
    if saved and system:
        raise LcrunError(f"--system: {context} continues a saved conversation with its own prompts; leave --system out")
    llm = load_llm(config, context)
    interactive = sys.stdin.isatty()
    base = [{"role": "system", "content": system}] if system else []
    messages = saved or list(base)
    if saved:
        info(f"continuing the saved conversation ({len(saved)} messages); /clear starts a new one")
    failed = False  # piped: a message that could not be answered makes the exit code 1
    if interactive:
        info(CHAT_HELP)
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except KeyboardInterrupt:
            click.echo("\n(/exit or Ctrl+D to quit)", err=True)
            continue
        except EOFError:
            break
        if not interactive and line == "":
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/help":
            info(CHAT_HELP)
            continue
        if line.strip() == "/clear":
            messages = list(base)
            llm.generator.reset()
            info("conversation cleared")
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            for piece in llm.chat_stream(messages, progress=_prefill_bar(), **sampling):
                reply.append(piece)
                click.echo(piece, nl=False)
                sys.stdout.flush()
        except KeyboardInterrupt:
            click.echo("\n(reply stopped)", err=True)
        except ContextOverflowError as exc:
            messages.pop()
            failed = True
            click.secho(f"error: {exc}. Use /clear to start over.", fg="red", err=True)
            continue
        click.echo()
        messages.append({"role": "assistant", "content": "".join(reply)})
        stats = llm.last_stats
        if stats.finish_reason == "context":
            info("(the context is full: /clear to start over, or restart with a larger --ctx)")
        _note_cut(stats, sampling["max_new_tokens"])
        if stats.decode_s > 0:
            info(f"[{stats.new_tokens} tokens, {stats.new_tokens / stats.decode_s:.1f} tok/s; "
                 f"prompt {stats.prompt_tokens} tokens, {stats.reused_tokens} reused]")
    if failed and not interactive:
        sys.exit(1)


def _saved_conversation(path: Path | None, header: dict[str, Any] | None) -> list[dict[str, str]]:
    """The conversation a saved context carries (`lcrun run --save-context` keeps it), or []."""
    if header is None:
        return []
    messages = (header.get("meta") or {}).get("messages")
    if messages is None:
        info(f"{path} holds no conversation (it was saved from a raw or token-id run): a message reuses its "
             "tokens only as far as they match")
        return []
    ok = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        raise LcrunError(f"{path}: its saved conversation is malformed (meta.messages must be a list of "
                         "{role, content} texts): save the context again")
    return list(messages)


@main.command()
@config_options
@sampling_options
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--prompt-file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path), default=None,
              help="Read the prompt from this file (- reads standard input).")
@click.option("--prompt-ids", default=None, metavar="IDS",
              help="Token ids, separated by commas or spaces, fed as they are (no chat template); the reply is "
                   "printed as ids. For models without a tokenizer (synthetic:NAME).")
@click.option("--chat/--raw", "use_chat", default=True, show_default=True,
              help="Wrap the prompt in the chat template, or complete it as raw text.")
@click.option("--save-context", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="After the reply, save the prompt's and reply's KV to this file (.lcctx) for `lcrun chat "
                   "--context` or `lcrun serve --context`.")
@context_option
@handle_errors
def run(config: LcrunConfig, prompt: str | None, prompt_file: Path | None, prompt_ids: str | None, use_chat: bool,
        save_context: Path | None, context: Path | None, **sampling_kw: Any) -> None:
    """Answer one prompt and exit."""
    if sum(p is not None for p in (prompt, prompt_file, prompt_ids)) != 1:
        raise click.UsageError("give exactly one of --prompt, --prompt-file or --prompt-ids")
    _check_save_path(save_context)
    _check_context(context)
    if prompt_file is not None:
        prompt = _read_prompt(prompt_file)
    ids = _parse_ids(prompt_ids) if prompt_ids is not None else None
    sampling = _sampling(**sampling_kw)
    if ids is None:
        _need_text_model(config, "run")
    elif sampling["stop"]:
        raise LcrunError("--stop strings apply to text; with --prompt-ids the reply is token ids: leave --stop out")
    llm = load_llm(config, context)
    messages = [{"role": "user", "content": prompt}]
    if ids is not None:
        tokens = llm.stream_ids(ids, progress=_prefill_bar(), **sampling)
        pieces = (f"{' ' if n else ''}{token}" for n, token in enumerate(tokens))
    elif use_chat:
        pieces = llm.chat_stream(messages, progress=_prefill_bar(), **sampling)
    else:
        pieces = llm.stream(prompt, progress=_prefill_bar(), **sampling)
    reply = []
    for piece in pieces:
        reply.append(piece)
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    if save_context is not None:
        # The conversation goes with a chat run's KV, so `lcrun chat --context` continues it.
        meta = {"messages": [*messages, {"role": "assistant", "content": "".join(reply)}]} \
            if ids is None and use_chat else None
        _save(llm, save_context, meta)
    s = llm.last_stats
    _note_cut(s, sampling["max_new_tokens"])
    rate = f", {s.new_tokens / s.decode_s:.1f} tok/s" if s.decode_s > 0 else ""
    info(f"[prompt {s.prompt_tokens} tokens in {s.prefill_s:.2f} s; {s.new_tokens} new tokens{rate}; "
         f"stopped: {s.finish_reason}]")


def _save(llm, path: Path, meta: dict[str, Any] | None) -> None:
    size = llm.save_context(str(path), meta=meta)
    info(f"saved the context ({len(llm.generator.cached_ids):,} tokens) to {path}: {size:,} bytes")


def _note_cut(stats, max_new_tokens: int) -> None:
    """One line on stderr when a reply ended at the token limit rather than where the model stopped."""
    if stats.finish_reason == "length":
        info(f"(reply cut at --max-new-tokens {max_new_tokens}: raise it for a longer reply)")


def _parse_ids(text: str) -> list[int]:
    """--prompt-ids: whole numbers separated by commas and/or spaces (the vocabulary is checked by LLM)."""
    words = text.replace(",", " ").split()
    bad = next((w for w in words if not w.isdigit()), None)
    if bad is not None or not words:
        raise LcrunError(f"--prompt-ids takes token ids (whole numbers from 0) separated by commas or spaces, got "
                         f"{bad if bad is not None else 'none'!r}")
    return [int(w) for w in words]


def _read_prompt(path: Path) -> str:
    """--prompt-file: a file's text, or standard input for ``-``."""
    try:
        if str(path) == "-":
            return sys.stdin.read()
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LcrunError(f"{'standard input' if str(path) == '-' else path}: cannot read the prompt ({exc})") from None


def _prefill_bar():
    """Prefill progress from the first chunk, for prefills long enough to wait for."""
    from lcrun.progress import progress_bar
    return progress_bar("prefill", "tok", min_total=PREFILL_BAR_MIN_TOKENS)


def plan_choice(config: LcrunConfig, gpu: str | None = None):
    """What `lcrun run` would do with ``config``, without loading weights: the resolved attention and
    its plan, through the same construct.plan_run that LLM calls. On the GPU of the built-in profile
    ``gpu`` if given, else this machine's GPU; a CPU-only machine plans for a GPU of --gpu-mem when
    given, else for the CPU."""
    import torch

    from lcrun.construct import plan_run, resolve_device, resolve_dtype
    from lcrun.runtime.loading import open_model

    model_cfg, source = open_model(config.model)
    device = resolve_device(config.device)
    on_gpu = device.type == "cuda" or config.gpu_mem is not None or gpu is not None
    dtype = resolve_dtype(config.dtype, torch.device("cuda") if on_gpu else device)
    return plan_run(config, model_cfg, device, dtype, source=source, what_if=True, cpu_plan=True, gpu=gpu)


@main.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--gpu", default=None, type=click.Choice(list(GPU_PROFILES), case_sensitive=False),
              help="Plan for this GPU (built-in profile: memory, memory bandwidth, PCIe link) instead of this machine's.")
@handle_errors
def plan(config: LcrunConfig, as_json: bool, gpu: str | None) -> None:
    """Show where weights and the KV cache would live, and the predicted decode speed."""
    import json

    from lcrun.planner import format_plan

    choice = plan_choice(config, gpu)
    show_attention(choice)
    if as_json:
        click.echo(json.dumps({**choice.plan.to_dict(), **choice.to_dict()}, indent=2))
    else:
        click.echo(format_plan(choice.plan))


@main.command()
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--kv-dir", default=None, help="Also measure the disk under this existing folder (writes 256 MiB, then removes it).")
@handle_errors
def calibrate(device: str, kv_dir: str | None) -> None:
    """Measure host->GPU, GPU memory and disk speeds once; `lcrun plan` uses them after."""
    from lcrun.construct import resolve_device
    from lcrun.offload.calibrate import calibrate as run_calibration
    from lcrun.planner import calibration_path, format_rate

    cal = run_calibration(resolve_device(device), kv_dir)
    for name in ("h2d_bytes_per_s", "gpu_mem_bytes_per_s", "disk_read_bytes_per_s", "disk_write_bytes_per_s"):
        value = getattr(cal, name)
        click.echo(f"{name.replace('_bytes_per_s', ''):12} {format_rate(value) if value else 'not measured'}")
    click.echo(f"saved to {calibration_path()}")


def _token_list(value: str | None, zero: bool = False) -> list[int]:
    """Token counts 'a,b,c'; ``zero``: '0' allowed too."""
    from lcrun.units import parse_tokens
    items = [v.strip() for v in value.split(",") if v.strip()] if value else []
    return [0 if zero and v == "0" else parse_tokens(v) for v in items]


@main.command()
@config_options
@click.option("--contexts", default=None, help="Comma-separated context lengths to sweep, e.g. 32k,128k,512k "
              "(default: --ctx). Each prefills that many random tokens (0: one token, as llama-bench's depth 0).")
@click.option("--steps", type=int, default=32, show_default=True,
              help="Decode steps timed per context (at least 2: the first, cold one is not counted).")
@click.option("--dense-contexts", default=None, help="Also run lcrun with --attention dense at these contexts.")
@click.option("--dense-cap/--no-dense-cap", default=True, show_default=True,
              help="Hold the --dense-contexts rows to --gpu-mem as well (--no-dense-cap: the dense reference with "
              "the whole GPU).")
@click.option("--transformers", "transformers_caches", default=None,
              help="Also run transformers' Llama on the same shape, comma-separated: dense (its dynamic GPU cache, "
              "eager), static (its static cache with a torch.compile'd CUDA-graph decode; GPU only), offloaded "
              "(GPU only).")
@click.option("--transformers-contexts", default=None, help="Contexts for transformers (default: --contexts).")
@click.option("--transformers-steps", type=int, default=None, help="Decode steps for transformers (default: --steps).")
@click.option("--transformers-cap/--no-transformers-cap", default=True, show_default=True,
              help="Hold transformers to --gpu-mem as well.")
@click.option("--trace", default=None, help="Write a Chrome trace (.json.gz) of 3 decode steps at the first context.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON file to write (default: bench-GPU-DATE.json here).")
@handle_errors
def bench(config: LcrunConfig, contexts: str | None, steps: int, dense_contexts: str | None, dense_cap: bool,
          transformers_caches: str | None, transformers_contexts: str | None, transformers_steps: int | None,
          transformers_cap: bool, trace: str | None, out: Path | None) -> None:
    """Prefill tokens/s and decode ms/token over context lengths (JSON), optionally beside transformers."""
    import json

    from lcrun.profiling.bench import Sweep, format_rows, run_sweep
    from lcrun.profiling.meta import gpu_slug

    if config.model is None:
        from lcrun.runtime.loading import default_model
        config = dataclasses.replace(config, model=default_model())
    if not dense_cap and not dense_contexts:
        warn("--no-dense-cap applies to the --dense-contexts rows, and none were asked for: ignored")
    sweep = Sweep(contexts=_token_list(contexts, zero=True) or [config.ctx_tokens], steps=steps,
                  dense_contexts=_token_list(dense_contexts), dense_capped=dense_cap,
                  transformers=[c.strip() for c in transformers_caches.split(",")] if transformers_caches else [],
                  transformers_contexts=_token_list(transformers_contexts) or None,
                  transformers_steps=transformers_steps, transformers_capped=transformers_cap, trace=trace)
    state: dict[str, Path] = {}

    def save(doc: dict) -> None:  # after every measurement: a sweep cut short keeps its rows
        if "path" not in state:
            state["path"] = out or Path(f"bench-{gpu_slug(doc['meta'])}-{doc['meta']['date'][:10]}.json")
            state["path"].parent.mkdir(parents=True, exist_ok=True)
        state["path"].write_text(json.dumps(doc, indent=2))

    result = run_sweep(config, sweep, log=info, checkpoint=save)
    path = state["path"]
    click.echo(format_rows(result["rows"]))
    for r in result["ratios"]:
        click.echo(f"{r['context']:>8} tokens: decode {r['decode_speedup']:.1f}x, prefill {r['prefill_speedup']:.1f}x "
                   f"against {r['baseline']}")
    info(f"wrote {path}")


@main.command("profile")
@config_options
@click.option("--prompt-tokens", type=int, default=None,
              help="Tokens to prefill (random ids) before decoding; default: the context less the decode steps.")
@click.option("--prompt-file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path), default=None,
              help="Prefill this text instead of random ids (models with a tokenizer; - reads standard input).")
@click.option("--steps", type=int, default=8, show_default=True, help="Decode steps under the profiler.")
@click.option("--timed-steps", type=int, default=32, show_default=True,
              help="Decode steps timed without the profiler, as generation runs them.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("lcrun-profile"),
              show_default=True, help="Folder for report.html, report.json and the trace.")
@handle_errors
def profile_cmd(config: LcrunConfig, prompt_tokens: int | None, prompt_file: Path | None, steps: int,
                timed_steps: int, out_dir: Path) -> None:
    """Profile prefill and decode; write a self-contained HTML report, its JSON and a Chrome trace."""
    from lcrun.profiling.collect import ProfileOptions, run_profile
    from lcrun.profiling.report import check_dependencies, write_report

    check_dependencies()
    opts = ProfileOptions(prompt_tokens=prompt_tokens or 0, steps=steps, timed_steps=timed_steps)
    if prompt_file is None and prompt_tokens is None:
        opts.prompt_tokens = config.ctx_tokens - opts.decode_tokens() - 1
    if prompt_file is None:
        opts.check(config.ctx_tokens)  # fail before loading the model
    llm = load_llm(config)
    if prompt_file is not None:
        text = _read_prompt(prompt_file)
        if llm.tokenizer is None:
            raise LcrunError(f"{llm.model_spec} has no tokenizer: profile it on random ids (--prompt-tokens)")
        opts.prompt_ids = llm.tokenizer.encode(text)
        opts.prompt_tokens = len(opts.prompt_ids)
    data = run_profile(llm, opts, out_dir, log=info)
    html, js = write_report(data, out_dir)
    d = data["decode"]
    click.echo(f"decode {d['timed_ms_median']:.2f} ms/token (floor {data['links']['weight_floor_ms']:.2f} ms); "
               f"prefill {data['prefill']['tok_s']:,.0f} tok/s")
    click.echo(f"wrote {html}, {js.name} and {data['trace']} in {out_dir}")


GRID_OPTIONS = ("tasks", "lengths", "modes", "trials", "fidelity_lengths", "fidelity_steps")


def _read_json(path: Path) -> Any:
    import json
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LcrunError(f"{path}: cannot read it as JSON ({exc})") from None


def _names(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


@main.command("eval")
@config_options(exclude=("ctx", "attention", "positions"))  # set per cell by --lengths and --modes
@click.option("--tasks", default="passkey", show_default=True,
              help="Comma-separated tasks: passkey, niah_single, niah_multikey, niah_multivalue. Empty: the "
              "fidelity test alone.")
@click.option("--lengths", default="1k,4k", show_default=True, help="Comma-separated prompt lengths in tokens "
              "(4096, 4k, 7.3k, 1M; k = 1024).")
@click.option("--modes", default="dense,topk", show_default=True,
              help="Comma-separated attention modes: auto (as `lcrun run` picks), dense, topk, or topk:true / "
              "topk:window (top-k with those --positions).")
@click.option("--trials", type=int, default=20, show_default=True,
              help="Prompts per task, length and mode, the needle's depth swept from 0 to 100%.")
@click.option("--fidelity-lengths", default=None, help="Also compare each non-dense mode's next-token "
              "logits with dense attention's on a fixed text, at these lengths (teacher-forced).")
@click.option("--fidelity-steps", type=int, default=512, show_default=True,
              help="Decode steps compared per fidelity length.")
@click.option("--time-limit", type=float, default=None,
              help="Seconds; measurements not started by then are skipped and listed in the JSON.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON file to write (default: eval-DATE.json here).")
@click.option("--suite", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Run the measurements listed in this JSON file instead of the --tasks x --lengths x --modes "
              "grid (format: lcrun.eval.Suite.from_json).")
@click.option("--table", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Print this results file as a markdown table and exit.")
@handle_errors
def eval_cmd(config: LcrunConfig, tasks: str, lengths: str, modes: str, trials: int, fidelity_lengths: str | None,
             fidelity_steps: int, time_limit: float | None, out: Path | None, suite: Path | None,
             table: Path | None) -> None:
    """Long-context quality: passkey and needle-in-a-haystack accuracy by length and depth, dense
    against top-k, and optionally the teacher-forced fidelity of top-k decoding (JSON)."""
    import datetime

    from lcrun.eval import Evaluator, Suite, markdown_table, run_eval

    if table is not None:
        try:
            click.echo(markdown_table(_read_json(table)))
        except (KeyError, TypeError) as exc:
            raise LcrunError(f"{table} is not an `lcrun eval` results file (no {exc})") from None
        return
    if suite is not None:
        source = click.get_current_context().get_parameter_source
        grid = [f"--{n.replace('_', '-')}" for n in GRID_OPTIONS if source(n) != click.core.ParameterSource.DEFAULT]
        if grid:
            raise click.UsageError(f"--suite lists every measurement: drop {', '.join(grid)}")
        plan = Suite.from_json(_read_json(suite))
    else:
        plan = Suite.grid(_names(tasks), _names(lengths), _names(modes), trials, _names(fidelity_lengths),
                          fidelity_steps)
    if not plan.cells and not plan.fidelity:
        raise click.UsageError("nothing to measure: give --tasks and --lengths, or --fidelity-lengths")
    plan.check()
    if config.model is None:
        from lcrun.runtime.loading import default_model
        config = dataclasses.replace(config, model=default_model())
        info(f"no --model given: using the built-in demo model {config.model}")
    out = out or Path(f"eval-{datetime.date.today()}.json")
    run_eval(Evaluator(config, log=info), plan, out, time_limit, log=info)
    info(f"wrote {out}")


@main.command()
@config_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@click.option("--api-key", envvar="LCRUN_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' (or set LCRUN_API_KEY).")
@click.option("--max-queue", type=int, default=8, show_default=True,
              help="Requests that may wait while one generates; past it the answer is 503 with Retry-After.")
@click.option("--max-body", default="32MiB", show_default=True, help="Largest request body.")
@click.option("--max-new-tokens", type=int, default=1024, show_default=True,
              help="Most tokens per reply for requests that give no max_tokens.")
@context_option
@click.option("--context-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep a prefix cache on disk here: requests with long prompts are saved, and a later "
                   "request (also after a restart) that starts with the same tokens loads them.")
@click.option("--context-min-tokens", type=int, default=1024, show_default=True,
              help="With --context-dir: save requests whose prompt has at least this many tokens.")
@handle_errors
def serve(config: LcrunConfig, host: str, port: int, api_key: str | None, max_queue: int, max_body: str,
          max_new_tokens: int, context: Path | None, context_dir: Path | None, context_min_tokens: int) -> None:
    """An OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models, /health."""
    import uvicorn

    from lcrun.serve import ServeSettings, create_app
    from lcrun.units import parse_bytes

    if not 0 <= port <= 65535:
        raise LcrunError(f"--port must be 0 to 65535, got {port}")
    settings = ServeSettings(api_key=api_key or None, max_queue=max_queue,
                             max_body_bytes=parse_bytes(max_body), default_max_tokens=max_new_tokens,
                             context_dir=str(context_dir) if context_dir else None,
                             context_min_tokens=context_min_tokens)
    if context_dir is None and click.get_current_context().get_parameter_source("context_min_tokens") \
            != click.core.ParameterSource.DEFAULT:
        raise LcrunError("--context-min-tokens applies with --context-dir: give both or neither")
    _need_text_model(config, "serve")
    _check_context(context)
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        warn(f"listening on {host} without --api-key: anyone who can reach this port can use the model")
    llm = load_llm(config, context)  # the first request that starts with its tokens reuses them
    settings.model_name = Path(str(llm.model_spec)).name
    info(f"serving {settings.model_name} on http://{host}:{port}/v1 (Ctrl+C stops)")
    uvicorn.run(create_app(llm, settings), host=host, port=port, log_level="warning")


@main.command()
@click.argument("folders", nargs=-1, type=click.Path(file_okay=False, path_type=Path))
def models(folders: tuple[Path, ...]) -> None:
    """List the models lcrun can find: the demo model, models under FOLDERS, synthetic specs."""
    from lcrun.runtime.loading import find_models
    for arg, what in find_models(list(folders) or [Path.cwd()]):
        click.echo(f"{arg}\t{what}")


if __name__ == "__main__":
    main()
