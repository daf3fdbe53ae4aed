"""The `lcrun` command: chat, run, models. Options come from LcrunConfig's fields."""
from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any, Callable

import click

from lcrun.config import LcrunConfig
from lcrun.errors import ContextOverflowError, LcrunError


def config_options(func: Callable) -> Callable:
    """Add one click option per LcrunConfig field; the command receives ``config=LcrunConfig``."""
    fields = LcrunConfig.cli_fields()

    @functools.wraps(func)
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
        click.option("--max-new-tokens", type=int, default=512, show_default=True, help="Most tokens per reply."),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass."),
        click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the k likeliest; 0 = off."),
    ]
    for opt in reversed(options):
        func = opt(func)
    return func


def handle_errors(func: Callable) -> Callable:
    """User errors print one line and exit 1; no traceback."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return func(*args, **kwargs)
        except LcrunError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(1)
    return wrapper


def info(message: str) -> None:
    click.secho(message, fg="cyan", err=True)


def load_llm(config: LcrunConfig):
    config.resolve()
    from lcrun.api import LLM
    from lcrun.runtime.loading import default_model

    if config.model is None:
        config.model = default_model()
        info(f"no --model given: using the built-in demo model {config.model}")
    info(f"context: {config.ctx_tokens} tokens ({config.ctx}); attention: {config.attention}")
    llm = LLM(config=config)
    info(f"loaded {llm.model_config.arch} model, {llm.model_config.num_layers} layers, on {llm.device} "
         f"({str(llm.dtype).replace('torch.', '')})")
    return llm


@click.group()
@click.version_option(package_name="lcrun")
def main() -> None:
    """lcrun: long-context LLM inference on one consumer GPU."""


def _sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> dict[str, Any]:
    return dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)


CHAT_HELP = "commands: /clear forgets the conversation, /exit quits, /help shows this; Ctrl+C stops a reply"


@main.command()
@config_options
@sampling_options
@click.option("--system", default=None, help="System prompt.")
@handle_errors
def chat(config: LcrunConfig, system: str | None, **sampling_kw: Any) -> None:
    """Chat with a model. Reads one message per line when stdin is not a terminal."""
    llm = load_llm(config)
    sampling = _sampling(**sampling_kw)
    interactive = sys.stdin.isatty()
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
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
            for piece in llm.chat_stream(messages, **sampling):
                reply.append(piece)
                click.echo(piece, nl=False)
                sys.stdout.flush()
        except KeyboardInterrupt:
            click.echo("\n(reply stopped)", err=True)
        except ContextOverflowError as exc:
            messages.pop()
            click.secho(f"error: {exc}. Use /clear to start over.", fg="red", err=True)
            continue
        click.echo()
        messages.append({"role": "assistant", "content": "".join(reply)})
        stats = llm.last_stats
        if stats.finish_reason == "context":
            info("(the context is full: /clear to start over, or restart with a larger --ctx)")
        if interactive and stats.decode_s > 0:
            info(f"[{stats.new_tokens} tokens, {stats.new_tokens / stats.decode_s:.1f} tok/s; "
                 f"prompt {stats.prompt_tokens} tokens, {stats.reused_tokens} reused]")


@main.command()
@config_options
@sampling_options
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--prompt-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Read the prompt from this file.")
@click.option("--chat/--raw", "use_chat", default=True, show_default=True,
              help="Wrap the prompt in the chat template, or complete it as raw text.")
@handle_errors
def run(config: LcrunConfig, prompt: str | None, prompt_file: Path | None, use_chat: bool, **sampling_kw: Any) -> None:
    """Answer one prompt and exit."""
    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give exactly one of --prompt or --prompt-file")
    if prompt_file is not None:
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LcrunError(f"{prompt_file}: cannot read the prompt ({exc})") from None
    llm = load_llm(config)
    pieces = (llm.chat_stream([{"role": "user", "content": prompt}], progress=_prefill_bar(), **_sampling(**sampling_kw))
              if use_chat else llm.stream(prompt, progress=_prefill_bar(), **_sampling(**sampling_kw)))
    for piece in pieces:
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    s = llm.last_stats
    rate = f", {s.new_tokens / s.decode_s:.1f} tok/s" if s.decode_s > 0 else ""
    info(f"[prompt {s.prompt_tokens} tokens in {s.prefill_s:.2f} s; {s.new_tokens} new tokens{rate}; "
         f"stopped: {s.finish_reason}]")


def _prefill_bar():
    """A tqdm bar for prefills long enough to wait for; tokens/s and time left come with it."""
    from tqdm import tqdm
    state: dict[str, Any] = {}

    def progress(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc="prefill", unit="tok", leave=False, file=sys.stderr,
                                disable=total < 4096)
        bar = state["bar"]
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
    return progress


def planner_inputs(config: LcrunConfig):
    """(ModelSpec, Hardware) for the planner: the model's shape without loading its weights, and
    this machine (the GPU through torch; a CPU-only machine plans for a GPU of --gpu-mem if given)."""
    import torch

    from lcrun.api import resolve_device, resolve_dtype
    from lcrun.planner import ModelSpec, detect_hardware
    from lcrun.runtime.loading import default_model, open_source
    from lcrun.runtime.synthetic import is_synthetic, synthetic_config

    spec = config.model or default_model()
    model_cfg = synthetic_config(spec) if is_synthetic(spec) else open_source(spec).config
    device = resolve_device(config.device)
    elem = torch.tensor([], dtype=resolve_dtype(config.dtype, torch.device("cuda"))).element_size()
    model = ModelSpec.from_dict(model_cfg.to_dict(), weight_bytes=model_cfg.num_parameters() * elem,
                                name=model_cfg.name or spec, kv_dtype_bytes=elem)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu_name, gpu_total = props.name, props.total_memory
    elif config.gpu_mem is not None:
        gpu_name, gpu_total = "GPU of --gpu-mem (no GPU on this machine)", config.gpu_mem_bytes
    else:
        gpu_name, gpu_total = None, None
    hw = detect_hardware(gpu_name, gpu_total, gpu_mem=config.gpu_mem, host_mem=config.host_mem, kv_dir=config.kv_dir)
    return model, hw


@main.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@handle_errors
def plan(config: LcrunConfig, as_json: bool) -> None:
    """Show where weights and the KV cache would live, and the predicted decode speed."""
    import json

    from lcrun.planner import format_plan, make_plan

    config.resolve()
    model, hw = planner_inputs(config)
    the_plan = make_plan(model, config.ctx_tokens, hw, budget_tokens=config.budget, sink_tokens=config.sink_tokens,
                         window_tokens=config.window_tokens, attention=config.attention)
    click.echo(json.dumps(the_plan.to_dict(), indent=2) if as_json else format_plan(the_plan))


@main.command()
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--kv-dir", default=None, help="Also measure the disk under this folder (writes 256 MiB).")
@handle_errors
def calibrate(device: str, kv_dir: str | None) -> None:
    """Measure host->GPU, GPU memory and disk speeds once; `lcrun plan` uses them after."""
    from lcrun.api import resolve_device
    from lcrun.offload.calibrate import calibrate as run_calibration
    from lcrun.planner import calibration_path, format_rate

    cal = run_calibration(resolve_device(device), kv_dir)
    for name in ("h2d_bytes_per_s", "gpu_mem_bytes_per_s", "disk_read_bytes_per_s", "disk_write_bytes_per_s"):
        value = getattr(cal, name)
        click.echo(f"{name.replace('_bytes_per_s', ''):12} {format_rate(value) if value else 'not measured'}")
    click.echo(f"saved to {calibration_path()}")


@main.command()
@click.argument("folders", nargs=-1, type=click.Path(file_okay=False, path_type=Path))
def models(folders: tuple[Path, ...]) -> None:
    """List the models lcrun can find: the demo model, models under FOLDERS, synthetic specs."""
    from lcrun.runtime.loading import find_models
    for arg, what in find_models(list(folders) or [Path.cwd()]):
        click.echo(f"{arg}\t{what}")


if __name__ == "__main__":
    main()
