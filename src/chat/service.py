"""ChatService: the one object the CLI, the API and the web UI call.

It owns the model (through an engine), the prompt format, the default generation parameters
and the response cache. Front ends hand it a ``Conversation`` and a message and get back a
``ReplyStream``: iterate it for text as it is generated, then read ``.result``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from src.chat.batching import BatchingEngine, supports_batching
from src.chat.cache import CachedReply, ResponseCache, cache_key
from src.chat.conversation import Conversation
from src.chat.engine import HFEngine
from src.chat.params import GenerationParams
from src.chat.prompts import PromptBuild, PromptFormat, build_prompt, detect_prompt_format
from src.chat.store import SessionStore
from src.chat.streaming import IncrementalDecoder, StopSequenceFilter
from src.config import Settings
from src.errors import InvalidRequestError, ModelLoadingError

logger = logging.getLogger(__name__)


@dataclass
class ChatResult:
    text: str
    finish_reason: str  # "stop" (EOS or stop sequence), "length", or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    dropped_messages: int  # oldest messages left out to fit the context window
    seconds: float
    first_token_seconds: float | None
    cached: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


class ReplyStream:
    """One reply being generated. Iterate once for text deltas; ``cancel()`` from anywhere
    (a signal handler, another thread) stops it after the current token.

    The exchange is added to the conversation (and to the session store, if the service has
    one) when generation ends, including when it was cancelled: the partial reply is kept, as
    in other chat UIs. A stream that is abandoned (``abandon()``, or closed before it ends,
    e.g. a web client that went away) changes nothing.
    """

    def __init__(
        self,
        service: ChatService,
        conversation: Conversation,
        user_message: str,
        prompt: PromptBuild,
        params: GenerationParams,
    ) -> None:
        self.service = service
        self.conversation = conversation
        self.user_message = user_message
        self.prompt = prompt
        self.params = params
        self.result: ChatResult | None = None
        self._cancelled = threading.Event()
        self._abandoned = False
        self._started = False

    def cancel(self) -> None:
        """Stop after the current token; the partial reply is kept."""
        self._cancelled.set()

    def abandon(self) -> None:
        """Stop after the current token and keep nothing (the client is gone)."""
        self._abandoned = True
        self._cancelled.set()

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a ReplyStream can be iterated only once")
        self._started = True
        return self._generate()

    def complete(self) -> ChatResult:
        """Generate the whole reply without streaming and return the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    def _generate(self) -> Iterator[str]:
        started = time.perf_counter()
        key = self.service.cache_key(self.prompt.input_ids, self.params)
        cached = self.service.cache.get(key) if key is not None else None
        if cached is not None:
            yield cached.text
            self._finish(
                cached.text,
                cached.finish_reason,
                cached.completion_tokens,
                started,
                time.perf_counter() - started,
                cached=True,
            )
            return

        decoder = IncrementalDecoder(self.service.tokenizer)
        stops = StopSequenceFilter(self.params.stop)
        engine = self.service.engine
        pieces: list[str] = []
        completion_tokens = 0
        first_token_seconds = None
        finish_reason = "length"
        tokens = engine.generate_token_ids(
            self.prompt.input_ids, self.params, should_stop=self._cancelled.is_set
        )
        for token_id in tokens:
            completion_tokens += 1
            if first_token_seconds is None:
                first_token_seconds = time.perf_counter() - started
            if token_id in engine.eos_token_ids:
                finish_reason = "stop"
                break
            shown = stops.push(decoder.push(token_id))
            if shown:
                pieces.append(shown)
                yield shown
            if stops.stopped:
                finish_reason = "stop"
                break
        tokens.close()
        tail = stops.push(decoder.flush()) + stops.flush()
        if tail:
            pieces.append(tail)
            yield tail
        if finish_reason == "length" and self._cancelled.is_set():
            finish_reason = "cancelled"
        text = "".join(pieces)
        if key is not None and finish_reason != "cancelled":
            self.service.cache.put(key, CachedReply(text, completion_tokens, finish_reason))
        self._finish(text, finish_reason, completion_tokens, started, first_token_seconds)

    def _finish(
        self,
        text: str,
        finish_reason: str,
        completion_tokens: int,
        started: float,
        first_token_seconds: float | None,
        cached: bool = False,
    ) -> None:
        if self._abandoned:
            return
        self.conversation.add_exchange(self.user_message, text)
        if self.conversation.persistent and self.service.store is not None:
            self.service.store.append_exchange(self.conversation, self.user_message, text)
        self.result = ChatResult(
            text=text,
            finish_reason=finish_reason,
            prompt_tokens=len(self.prompt.input_ids),
            completion_tokens=completion_tokens,
            dropped_messages=self.prompt.dropped_messages,
            seconds=time.perf_counter() - started,
            first_token_seconds=first_token_seconds,
            cached=cached,
        )


def check_text(field: str, text: str) -> None:
    """Reject text that is not valid Unicode (a lone surrogate such as JSON's "\ud800"):
    tokenizers and SQLite cannot take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{field}: invalid Unicode (a lone surrogate) at character {exc.start}"
        ) from None


def scratch_model(loaded: Any) -> Any:
    """Our from-scratch transformer with the loaded model's weights."""
    from src.models.transformer import Transformer

    if loaded.adapter is not None:
        raise ModelLoadingError(
            "ENGINE=scratch runs base models only; LoRA adapters need ENGINE=hf."
        )
    try:
        return Transformer.from_hf(loaded.model)
    except ValueError as exc:
        raise ModelLoadingError(f"ENGINE=scratch cannot run {loaded.name}: {exc}") from exc


class ChatService:
    def __init__(
        self,
        engine: HFEngine | BatchingEngine,
        model_name: str,
        default_params: GenerationParams | None = None,
        max_length: int = 1024,
        cache_size: int = 256,
        default_system_prompt: str | None = None,
        store: SessionStore | None = None,
        max_message_chars: int = 16_000,
    ) -> None:
        self.max_message_chars = max_message_chars
        self.engine = engine
        self.store = store  # where sessions persist (the API's SQLite file); None in the CLI
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.default_params = default_params or GenerationParams()
        self.default_system_prompt = default_system_prompt
        # MAX_LENGTH caps the window (prompt + reply); the model's own limit caps MAX_LENGTH.
        self.context_window = min(max_length, engine.max_positions)
        self.prompt_format: PromptFormat = detect_prompt_format(self.tokenizer)
        self.cache = ResponseCache(cache_size)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        model_name: str | None = None,
        adapter_path: Any = None,
        batching: bool = False,
        store: SessionStore | None = None,
        engine_name: str | None = None,
    ) -> ChatService:
        """Load the configured model (see ``src.models.loader``) and wrap it in a service.

        ``batching=True`` (the API server) decodes concurrent requests together.
        ``engine_name`` ("hf" or "scratch", default ENGINE) picks whose forward pass runs:
        transformers' or our from-scratch transformer on the same weights.
        """
        from src.models.loader import load_model

        loaded = load_model(settings, model_name=model_name, adapter_path=adapter_path)
        name = loaded.name if loaded.adapter is None else f"{loaded.name}+{loaded.adapter.name}"
        model = loaded.model
        if (engine_name or settings.engine) == "scratch":
            model = scratch_model(loaded)
        if batching and not supports_batching(model):
            logger.warning(
                "Notice: %s uses sliding-window attention; requests will not be batched together.",
                name,
            )
            batching = False
        if batching:
            engine = BatchingEngine(model, loaded.tokenizer, settings.max_batch_size)
        else:
            engine = HFEngine(model, loaded.tokenizer)
        return cls(
            engine,
            model_name=name,
            default_params=settings.generation_defaults(),
            max_length=settings.max_length,
            cache_size=settings.response_cache_size,
            default_system_prompt=settings.system_prompt,
            store=store,
            max_message_chars=settings.max_message_chars,
        )

    @property
    def supports_system_prompt(self) -> bool:
        return self.prompt_format is PromptFormat.CHAT_TEMPLATE

    def new_conversation(self, system_prompt: str | None = None) -> Conversation:
        """A conversation held by the caller (the CLI, a stateless OpenAI request)."""
        return Conversation(system_prompt=system_prompt or self.default_system_prompt)

    # ---- sessions: conversations kept in the store (the API's) --------------------------------

    def new_session(self, system_prompt: str | None = None) -> Conversation:
        """A conversation saved to the store with each completed exchange."""
        if self.store is None:
            raise RuntimeError("this ChatService has no session store")
        conversation = self.new_conversation(system_prompt)
        conversation.persistent = True
        return conversation

    def get_session(self, session_id: str) -> Conversation | None:
        return self.store.get(session_id) if self.store is not None else None

    def delete_session(self, session_id: str) -> bool:
        return self.store.delete(session_id) if self.store is not None else False

    def start_reply(
        self,
        conversation: Conversation,
        user_message: str,
        params: GenerationParams | None = None,
    ) -> ReplyStream:
        """Validate and build the prompt now (errors raise here, before any text streams)."""
        params = params or self.default_params
        if not isinstance(user_message, str) or not user_message.strip():
            raise InvalidRequestError("message: must not be empty")
        check_text("message", user_message)
        check_text("system_prompt", conversation.system_prompt or "")
        for message in conversation.messages:
            check_text("messages", message["content"])
        if len(user_message) > self.max_message_chars:
            raise InvalidRequestError(
                f"message: {len(user_message)} characters is over the limit of "
                f"{self.max_message_chars} (MAX_MESSAGE_CHARS)"
            )
        max_prompt_tokens = self.context_window - params.max_new_tokens
        if max_prompt_tokens < 1:
            raise InvalidRequestError(
                f"max_new_tokens={params.max_new_tokens} leaves no room for the prompt in the "
                f"{self.context_window}-token context window; use a smaller max_new_tokens "
                "(or raise MAX_LENGTH)."
            )
        system_prompt = conversation.system_prompt if self.supports_system_prompt else None
        messages = conversation.messages + [{"role": "user", "content": user_message}]
        prompt = build_prompt(
            self.tokenizer, self.prompt_format, system_prompt, messages, max_prompt_tokens
        )
        return ReplyStream(self, conversation, user_message, prompt, params)

    def reply(
        self,
        conversation: Conversation,
        user_message: str,
        params: GenerationParams | None = None,
    ) -> ChatResult:
        """Generate a whole reply (no streaming)."""
        return self.start_reply(conversation, user_message, params).complete()

    def cache_key(self, prompt_ids: list[int], params: GenerationParams) -> tuple | None:
        """The cache key for a deterministic request, or None for a sampled one."""
        return cache_key(self.model_name, prompt_ids, params) if params.is_greedy else None
