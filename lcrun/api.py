"""The local Python API: ``from lcrun import LLM``. The run is built by lcrun.construct.

    llm = LLM("path/to/model-or.gguf", ctx="128k")
    print(llm.generate("The capital of France is", max_new_tokens=16))
    for piece in llm.chat_stream([{"role": "user", "content": "Hi!"}]):
        print(piece, end="")
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Iterator

import torch

from lcrun.config import LcrunConfig
from lcrun.construct import (check_host_memory, cpu_ignored_settings, make_cache, plan_run, resolve_device,
                             resolve_dtype, resolve_positions)
from lcrun.errors import CapacityError, ConfigError, IgnoredSettingWarning, LcrunError, TrainedWindowWarning
from lcrun.progress import progress_bar
from lcrun.runtime.build import load_model, random_model
from lcrun.runtime.chat_template import render_chat
from lcrun.runtime.generate import GenerationStats, Generator, ProgressFn
from lcrun.runtime.loading import default_model, open_model
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.sampling import SamplingParams
from lcrun.runtime.stop_text import StopText
from lcrun.runtime.tokenizer import StreamDecoder, TextTokenizer
from lcrun.runtime.weight_footprint import weights_mode


class LLM:
    """A loaded model with its KV cache, ready to generate. Settings are LcrunConfig's fields.

    ``attention`` ("dense" or "topk") and ``attention_reason`` say what --attention resolved to and
    why; ``config`` is the settings with that resolved value (a copy: configs are immutable);
    ``plan`` is the memory plan on a GPU (None on the CPU)."""

    def __init__(self, model: str | None = None, *, config: LcrunConfig | None = None, progress: bool = True,
                 context: str | None = None, **settings: Any):
        """context: a saved context (LLM.save_context, --save-context) to load once the model is."""
        if config is None:
            config = LcrunConfig.from_kwargs(model=model, **settings)
        elif model is not None or settings:
            raise ConfigError("pass either config= or model/settings, not both")
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.settings_warning: str | None = None  # settings this device does not use, one line
        if self.device.type == "cpu":
            self.settings_warning = cpu_ignored_settings(config)
            if self.settings_warning:
                warnings.warn(self.settings_warning, IgnoredSettingWarning, stacklevel=2)
        if self.device.type == "cuda":
            # The fraction is process-wide: set it every time, so an earlier LLM's cap does not
            # linger on one made without --gpu-mem.
            total = torch.cuda.get_device_properties(self.device).total_memory
            cap = config.gpu_mem_bytes
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total) if cap else 1.0, self.device)
        self.model_spec = config.model or default_model()
        self.tokenizer: TextTokenizer | None = None
        model_cfg, source = open_model(self.model_spec)
        # Before allocating anything: --attention resolved and, on a GPU, the plan for it (which
        # says what is short when the context does not fit the caps).
        choice = plan_run(config, model_cfg, self.device, self.dtype, source=source)
        self.attention_choice = choice
        self.attention: str = choice.attention            # "dense" or "topk"
        self.attention_reason: str = choice.reason
        self.attention_warning: str | None = choice.warning
        if choice.warning:
            warnings.warn(choice.warning, TrainedWindowWarning, stacklevel=2)
        config = dataclasses.replace(config, attention=choice.attention)
        self.config = config
        self.plan = choice.plan if self.device.type == "cuda" else None
        self.positions = resolve_positions(config, model_cfg)  # when queries move to window positions
        if self.device.type == "cpu":
            check_host_memory(config, model_cfg, self.dtype, self.positions)
        try:
            if source is None:
                self.model = random_model(model_cfg, self.device, self.dtype, seed=config.seed,
                                          weights=weights_mode(config.weights, self.device))
            else:
                self.tokenizer = source.tokenizer()
                self.model = load_model(source, self.device, self.dtype,
                                        progress=progress_bar("loading", "layer") if progress else None,
                                        weights=weights_mode(config.weights, self.device))
            self.cache = make_cache(config, self.model.cfg, self.device, self.dtype,
                                    self.plan if config.attention == "topk" else None)
        except torch.cuda.OutOfMemoryError as exc:
            raise CapacityError(f"out of GPU memory while loading ({str(exc).splitlines()[0]}): "
                                "lower --ctx or free the GPU") from None
        self.generator = Generator(self.model, self.cache, config.prefill_chunk)
        self.model_config: ModelConfig = self.model.cfg
        self.closed = False
        self.context_header: dict[str, Any] | None = None  # the last saved context loaded
        if context is not None:
            self.load_context(context)

    def close(self) -> None:
        """Release the weights and the KV cache: GPU memory, pinned host pools and the KV folder
        under --kv-dir. Closing twice is fine; a closed LLM refuses to generate."""
        if self.closed:
            return
        self.closed = True
        self.cache.close()
        del self.generator, self.cache, self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the freed blocks back to the GPU, not only to torch's pool

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _live_generator(self) -> Generator:
        if self.closed:
            raise LcrunError("this LLM was closed (LLM.close or the end of its with block): make a new LLM")
        return self.generator

    # -- token level -------------------------------------------------------------------------
    def _need_tokenizer(self) -> TextTokenizer:
        if self.tokenizer is None:
            raise LcrunError(f"{self.model_spec} has no tokenizer (synthetic weights): pass token ids to LLM.stream_ids instead")
        return self.tokenizer

    def stream_ids(self, prompt_ids: list[int], progress: ProgressFn | None = None, **sampling: Any) -> Iterator[int]:
        params = self._sampling(sampling)
        if params.stop:
            raise ConfigError("stop strings apply to text: use LLM.stream or LLM.chat_stream (stream_ids yields "
                              "token ids)")
        return self._stream_ids(prompt_ids, progress, params)

    def _sampling(self, sampling: dict[str, Any]) -> SamplingParams:
        return SamplingParams.from_kwargs(**{"seed": self.config.seed, **sampling})

    def _stream_ids(self, prompt_ids: list[int], progress: ProgressFn | None, params: SamplingParams) -> Iterator[int]:
        if len(prompt_ids) == 0:
            raise LcrunError("the prompt is empty: give some text to continue")
        vocab = self.model_config.vocab_size
        bad = next((i for i in prompt_ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise LcrunError(f"token id {bad} is outside {self.model_spec}'s vocabulary of {vocab} (0 to {vocab - 1})")
        stop = self.tokenizer.stop_ids if self.tokenizer else set()
        return self._live_generator().stream(list(prompt_ids), params, stop, progress)

    def _stream_text(self, ids: list[int], progress: ProgressFn | None, sampling: dict) -> Iterator[str]:
        params = self._sampling(sampling)
        decoder = StreamDecoder(self._need_tokenizer())
        stopper = StopText(params.stop)
        tokens = self._stream_ids(ids, progress, params)
        for token in tokens:
            piece = stopper.push(decoder.push(token))
            if piece:
                yield piece
            if stopper.stopped:
                tokens.close()  # no more decoding; the cache holds exactly the tokens before this one
                break
        else:
            tail = stopper.push(decoder.flush())
            tail += stopper.flush()
            if tail:
                yield tail
        if stopper.stopped:
            self.last_stats.finish_reason = "stop"

    # -- text level --------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        tok = self._need_tokenizer()
        text = render_chat(tok.chat_template, messages, add_generation_prompt=True,
                           bos_token=tok.bos_token, eos_token=tok.eos_token)
        return tok.encode(text, add_special_tokens=False)

    def stream(self, prompt: str, progress: ProgressFn | None = None, **sampling: Any) -> Iterator[str]:
        """Plain completion of ``prompt``, yielding text as it forms."""
        return self._stream_text(self._need_tokenizer().encode(prompt), progress, sampling)

    def generate(self, prompt: str, **sampling: Any) -> str:
        return "".join(self.stream(prompt, **sampling))

    def chat_stream(self, messages: list[dict[str, Any]], progress: ProgressFn | None = None,
                    **sampling: Any) -> Iterator[str]:
        """The assistant's next reply to ``messages``, through the model's chat template."""
        return self._stream_text(self.encode_chat(messages), progress, sampling)

    def chat(self, messages: list[dict[str, Any]], **sampling: Any) -> str:
        return "".join(self.chat_stream(messages, **sampling))

    def stream_text_ids(self, prompt_ids: list[int], progress: ProgressFn | None = None,
                        **sampling: Any) -> Iterator[str]:
        """The text that follows ``prompt_ids`` (already encoded, e.g. by encode_chat), as it forms."""
        return self._stream_text(list(prompt_ids), progress, sampling)

    # -- saved contexts (lcrun.runtime.context_file) -----------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        from lcrun.runtime.context_file import model_fingerprint
        return model_fingerprint(self.model_spec, self.model_config, self.config.seed)

    def save_context(self, path: str, meta: dict[str, Any] | None = None) -> int:
        """Save the tokens now in the cache and their KV (the last prompt and reply) to ``path``,
        atomically; ``meta`` (JSON) is kept with them, e.g. the conversation. Returns the bytes written."""
        from lcrun.runtime.context_file import save_context
        return save_context(path, self._live_generator(), self._fingerprint(), meta)

    def load_context(self, path: str) -> dict[str, Any]:
        """Restore a saved context: the next prompt that starts with its tokens prefills only the
        rest. Returns its header (``meta``: what the saver kept with it)."""
        from lcrun.runtime.context_file import load_context
        self.context_header = load_context(path, self._live_generator(), self._fingerprint())
        return self.context_header

    @property
    def last_stats(self) -> GenerationStats:
        return self._live_generator().last_stats
