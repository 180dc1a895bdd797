"""BACKEND=local (the default): generation by a model on this machine.

``LocalBackend`` is one of the two backends behind ``ChatService`` (the other is
``RemoteBackend`` in ``src/chat/remote.py``); the service asks a backend for two things:

- ``build_prompt(system_prompt, messages, params)``: here, token ids in the model's own format
  (chat template or DialoGPT's EOS-joined turns), the oldest turns dropped to fit the context
  window;
- ``start(prompt, params, should_stop)``: a generation to iterate for text deltas, which then
  reports ``finish_reason`` ("stop" or "length"), ``prompt_tokens``, ``completion_tokens`` and
  ``first_token_at``. Here the engine's token ids go through ``IncrementalDecoder`` and
  ``StopSequenceFilter``; ``should_stop`` is checked before every token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from src.chat.prompts import PromptBuild, PromptFormat, build_prompt, detect_prompt_format
from src.chat.streaming import IncrementalDecoder, StopSequenceFilter
from src.engine.batching import BatchingEngine
from src.errors import InvalidRequestError
from src.models.model_info import kv_bytes_per_token
from src.params import GenerationParams


class LocalBackend:
    """Text in, text out, around the engine (token ids in, token ids out).

    ``context_window``: the most tokens of prompt and reply together (the model's own limit,
    bounded by memory: see ``src.models.model_info.context_window``)."""

    kind = "local"

    def __init__(
        self,
        engine: BatchingEngine,
        tokenizer: Any,
        context_window: int,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.context_window = context_window
        # What a conversation filling the window holds in the KV cache (--verbose, /health).
        self.kv_cache_bytes = context_window * kv_bytes_per_token(engine.model)
        self.prompt_format: PromptFormat = detect_prompt_format(tokenizer)

    def close(self) -> None:
        """Stop the engine's thread (replies still running end with ``EngineClosedError``)."""
        self.engine.close()

    @property
    def supports_system_prompt(self) -> bool:
        return self.prompt_format is PromptFormat.CHAT_TEMPLATE

    def build_prompt(
        self, system_prompt: str | None, messages: list[dict[str, str]], params: GenerationParams
    ) -> PromptBuild:
        max_prompt_tokens = self.context_window - params.max_new_tokens
        if max_prompt_tokens < 1:
            raise InvalidRequestError(
                f"max_new_tokens={params.max_new_tokens} leaves no room for the prompt in the "
                f"{self.context_window}-token context window; use a smaller max_new_tokens.",
                field="max_new_tokens",
            )
        system_prompt = system_prompt if self.supports_system_prompt else None
        return build_prompt(
            self.tokenizer, self.prompt_format, system_prompt, messages, max_prompt_tokens
        )

    def cache_material(self, prompt: PromptBuild) -> tuple:
        """What identifies the prompt in the response cache: its exact token ids."""
        return tuple(prompt.input_ids)

    def start(
        self, prompt: PromptBuild, params: GenerationParams, should_stop: Callable[[], bool]
    ) -> LocalGeneration:
        return LocalGeneration(self, prompt, params, should_stop)


class LocalGeneration:
    """One reply from the local engine, as text deltas. Nothing runs until it is iterated."""

    def __init__(
        self,
        backend: LocalBackend,
        prompt: PromptBuild,
        params: GenerationParams,
        should_stop: Callable[[], bool],
    ) -> None:
        self.eos_token_ids = backend.engine.eos_token_ids
        self.decoder = IncrementalDecoder(backend.tokenizer)
        self.stops = StopSequenceFilter(params.stop)
        self.finish_reason = "length"  # until EOS or a stop sequence says "stop"
        self.prompt_tokens = len(prompt.input_ids)
        self.completion_tokens = 0
        self.first_token_at: float | None = None  # time.perf_counter() of the first token
        self._tokens = backend.engine.generate_token_ids(
            prompt.input_ids, params, should_stop=should_stop
        )

    def __iter__(self) -> Iterator[str]:
        for token_id in self._tokens:
            self.completion_tokens += 1
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            if token_id in self.eos_token_ids:
                self.finish_reason = "stop"
                break
            shown = self.stops.push(self.decoder.push(token_id))
            if shown:
                yield shown
            if self.stops.stopped:
                self.finish_reason = "stop"
                break
        self.close()
        tail = self.stops.push(self.decoder.flush()) + self.stops.flush()
        if tail:
            yield tail

    def close(self) -> None:
        """Stop the engine's token generator (which frees the request's row)."""
        self._tokens.close()
