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
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from src.chat.deltas import Delta, TokenInfo
from src.chat.prompts import (
    PromptFormat,
    build_prompt,
    detect_prompt_format,
    encode_conversation,
)
from src.chat.streaming import IncrementalDecoder, StopSequenceFilter
from src.chat.structured import GrammarCompiler, response_format_grammar
from src.chat.tools import ToolCall, ToolCallStream, ToolSet, tool_grammar
from src.engine.batching import BatchingEngine
from src.engine.logits import GeneratedToken
from src.errors import InvalidRequestError
from src.models.model_info import kv_bytes_per_token
from src.params import GenerationParams

if TYPE_CHECKING:
    from src.models.inference import InferenceModel


@dataclass
class LocalPrompt:
    """A prompt ready for the engine: its token ids and what holds the reply to a shape."""

    input_ids: list[int]
    dropped_messages: int = 0  # oldest messages left out to fit the context window
    grammar: str | None = None  # llguidance grammar (response_format or tools), checked
    tools: ToolSet | None = None  # replies are read for tool calls


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
        self.vocab_size = int(engine.model.config.vocab_size)
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, engine.eos_token_ids)
        self._token_infos: dict[int, tuple[str, bytes]] = {}
        # The model as the stack loaded it (src/models/inference.py): adapters share it.
        self.loaded: InferenceModel | None = None

    def close(self) -> None:
        """Stop the engine's thread (replies still running end with ``EngineClosedError``)."""
        self.engine.close()

    @property
    def supports_system_prompt(self) -> bool:
        return self.prompt_format is PromptFormat.CHAT_TEMPLATE

    def _room_for_prompt(self, params: GenerationParams) -> int:
        room = self.context_window - params.max_new_tokens
        if room < 1:
            raise InvalidRequestError(
                f"max_new_tokens={params.max_new_tokens} leaves no room for the prompt in the "
                f"{self.context_window}-token context window; use a smaller max_new_tokens.",
                field="max_new_tokens",
            )
        return room

    def build_prompt(
        self,
        system_prompt: str | None,
        messages: list[dict[str, Any]],
        params: GenerationParams,
        tools: ToolSet | None = None,
    ) -> LocalPrompt:
        max_prompt_tokens = self._room_for_prompt(params)
        grammar = self._grammar(params, tools)
        system_prompt = system_prompt if self.supports_system_prompt else None
        shown = tools.tools if tools is not None and tools.active else ()
        built = build_prompt(
            self.tokenizer, self.prompt_format, system_prompt, messages, max_prompt_tokens, shown
        )
        return LocalPrompt(built.input_ids, built.dropped_messages, grammar, tools)

    def build_raw_prompt(self, prompt: str | list[int], params: GenerationParams) -> LocalPrompt:
        """A prompt used as it is (legacy completions): text, or token ids."""
        max_prompt_tokens = self._room_for_prompt(params)
        grammar = self._grammar(params, None)
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = list(prompt)
            bad = [token for token in ids if not 0 <= token < self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"prompt: token id {bad[0]} is not in the vocabulary (0 to "
                    f"{self.vocab_size - 1})",
                    "prompt",
                )
        if not ids:
            raise InvalidRequestError("prompt: must not be empty", "prompt")
        if len(ids) > max_prompt_tokens:
            raise InvalidRequestError(
                f"prompt: {len(ids)} tokens, but only {max_prompt_tokens} fit the context "
                "window after reserving max_tokens",
                "prompt",
            )
        return LocalPrompt(ids, 0, grammar)

    def _grammar(self, params: GenerationParams, tools: ToolSet | None) -> str | None:
        """The grammar this request's reply must follow, checked now (a 400 names what is
        wrong before anything is generated)."""
        bad = [token for token in params.logit_bias if token >= self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"logit_bias: token id {bad[0]} is not in the vocabulary (0 to "
                f"{self.vocab_size - 1})",
                "logit_bias",
            )
        tools_grammar = tool_grammar(tools) if tools is not None else None
        format_grammar = response_format_grammar(params.response_format)
        if tools_grammar and format_grammar:
            raise InvalidRequestError(
                "response_format: cannot be combined with tools the model may call; use one "
                "or the other (or tool_choice 'none')",
                "response_format",
            )
        if tools_grammar:
            self.grammars.check(tools_grammar, "tools")
        if format_grammar:
            self.grammars.check(format_grammar, "response_format")
        return tools_grammar or format_grammar

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def detokenize(self, token_ids: list[int]) -> str:
        bad = [token for token in token_ids if not 0 <= token < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"tokens: {bad[0]} is not in the vocabulary (0 to {self.vocab_size - 1})",
                "tokens",
            )
        return self.tokenizer.decode(token_ids)

    def render(
        self,
        system_prompt: str | None,
        messages: list[dict[str, Any]],
        generation_prompt: bool,
        tools: ToolSet | None = None,
    ) -> list[int]:
        """A conversation's token ids, whole (nothing dropped), with the tools shown as a
        reply's prompt shows them."""
        system_prompt = system_prompt if self.supports_system_prompt else None
        shown = tools.tools if tools is not None and tools.active else ()
        return encode_conversation(
            self.tokenizer, self.prompt_format, system_prompt, messages, generation_prompt, shown
        )

    def prompt_tokens(self, prompt: LocalPrompt) -> int | None:
        return len(prompt.input_ids)

    def together(self, requests: int = 1) -> AbstractContextManager[None]:
        """The ``requests`` replies started inside this block are prefilled and batched
        together; ``ServerBusyError`` when the engine's queue has no room for them."""
        return self.engine.together(requests)

    def cache_material(self, prompt: LocalPrompt) -> tuple:
        """What identifies the prompt in the response cache: its exact token ids."""
        return tuple(prompt.input_ids)

    def start(
        self, prompt: LocalPrompt, params: GenerationParams, should_stop: Callable[[], bool]
    ) -> LocalGeneration:
        return LocalGeneration(self, prompt, params, should_stop)

    def token_info(self, token: GeneratedToken) -> TokenInfo:
        """A generated token's text, bytes, log-probability and alternatives."""
        text, raw = self.token_text(token.token_id)
        top = tuple((*self.token_text(token_id), logprob) for token_id, logprob in token.top)
        return TokenInfo(text, raw, token.logprob, top)

    def token_text(self, token_id: int) -> tuple[str, bytes]:
        known = self._token_infos.get(token_id)
        if known is None:
            try:
                raw = self.grammars.token_bytes(token_id)
            except InvalidRequestError:  # not a Rust tokenizer: its own decoding
                raw = self.tokenizer.decode([token_id]).encode()
            known = (raw.decode("utf-8", errors="replace"), raw)
            self._token_infos[token_id] = known
        return known


class LocalGeneration:
    """One reply from the local engine, as deltas. Nothing runs until it is iterated."""

    def __init__(
        self,
        backend: LocalBackend,
        prompt: LocalPrompt,
        params: GenerationParams,
        should_stop: Callable[[], bool],
    ) -> None:
        self.backend = backend
        self.eos_token_ids = backend.engine.eos_token_ids
        self.decoder = IncrementalDecoder(backend.tokenizer)
        self.stops = StopSequenceFilter(params.stop)
        self.tool_stream = ToolCallStream() if prompt.tools and prompt.tools.active else None
        self.finish_reason = "length"  # until EOS or a stop sequence says "stop"
        self.stop_sequence: str | None = None  # the one that ended the reply, if one did
        self.prompt_tokens = len(prompt.input_ids)
        self.completion_tokens = 0
        self.first_token_at: float | None = None  # time.perf_counter() of the first token
        self.prompt_logprobs: list[TokenInfo] = []  # with params.prompt_logprobs
        self._prompt_sent = False
        constraint = None
        if prompt.grammar is not None:
            constraint = backend.grammars.constraint(prompt.grammar)
        self._tokens = backend.engine.generate(
            prompt.input_ids, params, should_stop=should_stop, constraint=constraint
        )

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.tool_stream.calls if self.tool_stream is not None else []

    def __iter__(self) -> Iterator[Delta]:
        pending: list[TokenInfo] = []  # log-probabilities of tokens whose text is held back
        for token in self._tokens:
            if token.in_prompt:
                self.prompt_logprobs.append(self.backend.token_info(token))
                continue
            self.completion_tokens += 1
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            if token.token_id in self.eos_token_ids:
                self.finish_reason = "stop"
                break
            if token.logprob is not None:
                pending.append(self.backend.token_info(token))
            delta = self._delta(self.stops.push(self.decoder.push(token.token_id)), pending)
            if delta:
                pending = []
                yield self._with_prompt(delta)
            if self.stops.stopped:
                self.finish_reason, self.stop_sequence = "stop", self.stops.matched
                break
        self.close()
        delta = self._delta(self.stops.push(self.decoder.flush()) + self.stops.flush(), [])
        delta.logprobs = pending
        if self.tool_stream is not None:
            rest, calls = self.tool_stream.flush()
            delta.text += rest
            delta.tool_calls += calls
        if self.tool_calls and self.finish_reason == "stop":  # not cut short by max_tokens
            self.finish_reason = "tool_calls"
        delta = self._with_prompt(delta)
        if delta:
            yield delta

    def _with_prompt(self, delta: Delta) -> Delta:
        """The first delta carries the prompt's scores (they come before any token)."""
        if self.prompt_logprobs and not self._prompt_sent:
            delta.prompt_logprobs = self.prompt_logprobs
            self._prompt_sent = True
        return delta

    def _delta(self, text: str, logprobs: list[TokenInfo]) -> Delta:
        if self.tool_stream is None:
            return Delta(text, logprobs) if text else Delta()
        content, calls = self.tool_stream.push(text)
        if not content and not calls:
            return Delta()
        return Delta(content, logprobs, calls)

    def close(self) -> None:
        """Stop the engine's token generator (which frees the request's row)."""
        self._tokens.close()

    def abandon(self) -> None:
        """Give the request up without waiting for the engine (it was never read)."""
        self._tokens.abandon()
