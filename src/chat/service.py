"""ChatService: the one object the CLI, the API and the web UI call.

It owns a backend, the default generation parameters, the response cache and the session
store. Front ends hand it a ``Conversation`` and a message and get back a ``ReplyStream``:
iterate it for text as it is generated, then read ``.result``.

The backend is where text comes from, behind one seam (``build_prompt`` and ``start``):
``LocalBackend`` (``src/chat/local.py``, BACKEND=local) runs a model on this machine through
an engine; ``RemoteBackend`` (``src/chat/remote.py``, BACKEND=remote) streams from an
OpenAI-compatible server. Everything else here (validation, streaming, cancellation, the
cache, sessions, timing) is the same for both.
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
from src.chat.local import LocalBackend
from src.chat.prefix_cache import PrefixCache
from src.chat.remote import RemoteBackend
from src.chat.store import SessionStore
from src.config import Settings
from src.errors import ConfigError, InvalidRequestError
from src.params import GenerationParams

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
    e.g. a web client that went away) changes nothing. A stream that was started must be
    iterated or abandoned: with a remote backend it holds an open response.
    """

    def __init__(
        self,
        service: ChatService,
        conversation: Conversation,
        user_message: str,
        prompt: Any,
        params: GenerationParams,
    ) -> None:
        self.service = service
        self.conversation = conversation
        self.user_message = user_message
        self.prompt = prompt  # the backend's: token ids (local) or messages (remote)
        self.params = params
        self.result: ChatResult | None = None
        self._cancelled = threading.Event()
        self._abandoned = False
        self._started = False  # iter() was called
        self._running = False  # the generator's body began (so its ``finally`` will run)
        self._started_at = time.perf_counter()
        self._key = service.cache_key(prompt, params)
        self._cached = service.cache.get(self._key) if self._key is not None else None
        # The generation starts now (nothing runs locally until iterated; a remote request is
        # sent, so a server that cannot be reached raises here, before any text streams).
        self._generation = None
        if self._cached is None:
            self._generation = service.backend.start(prompt, params, self._cancelled.is_set)

    def cancel(self) -> None:
        """Stop after the current token; the partial reply is kept."""
        self._cancelled.set()

    def abandon(self) -> None:
        """Stop after the current token and keep nothing (the client is gone)."""
        self._abandoned = True
        self._cancelled.set()
        if not self._running and self._generation is not None:
            self._generation.close()  # never iterated: release it (a remote response) now

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
        self._running = True
        cached = self._cached
        if cached is not None:
            yield cached.text
            self._finish(cached, None, cached=True)
            return

        generation = self._generation
        pieces: list[str] = []
        try:
            for piece in generation:
                pieces.append(piece)
                yield piece
        finally:
            generation.close()
        finish_reason = generation.finish_reason
        if finish_reason == "length" and self._cancelled.is_set():
            finish_reason = "cancelled"
        reply = CachedReply(
            "".join(pieces), generation.completion_tokens, finish_reason, generation.prompt_tokens
        )
        if self._key is not None and finish_reason != "cancelled":
            self.service.cache.put(self._key, reply)
        first_token_at = generation.first_token_at
        first_token_seconds = None if first_token_at is None else first_token_at - self._started_at
        self._finish(reply, first_token_seconds)

    def _finish(
        self, reply: CachedReply, first_token_seconds: float | None, cached: bool = False
    ) -> None:
        if self._abandoned:
            return
        self.conversation.add_exchange(self.user_message, reply.text)
        if self.conversation.persistent and self.service.store is not None:
            self.service.store.append_exchange(self.conversation, self.user_message, reply.text)
        seconds = time.perf_counter() - self._started_at
        self.result = ChatResult(
            text=reply.text,
            finish_reason=reply.finish_reason,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            dropped_messages=self.prompt.dropped_messages,
            seconds=seconds,
            first_token_seconds=seconds if cached else first_token_seconds,
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


class ChatService:
    def __init__(
        self,
        backend: LocalBackend | RemoteBackend | HFEngine | BatchingEngine,
        model_name: str,
        default_params: GenerationParams | None = None,
        max_length: int = 1024,
        cache_size: int = 256,
        default_system_prompt: str | None = None,
        store: SessionStore | None = None,
        max_message_chars: int = 16_000,
    ) -> None:
        """``backend`` may be an engine: it then runs here, in a ``LocalBackend`` whose context
        window is ``max_length`` (capped by the model's own limit)."""
        if not isinstance(backend, LocalBackend | RemoteBackend):
            backend = LocalBackend(backend, max_length)
        self.backend = backend
        local = backend if isinstance(backend, LocalBackend) else None
        # The local model's parts, for tests and scripts (None with a remote backend).
        self.engine = local.engine if local else None
        self.tokenizer = local.tokenizer if local else None
        self.context_window = local.context_window if local else None
        self.prompt_format = local.prompt_format if local else None
        self.max_message_chars = max_message_chars
        self.store = store  # where sessions persist (the API's SQLite file); None in the CLI
        self.model_name = model_name
        self.default_params = default_params or GenerationParams()
        self.default_system_prompt = default_system_prompt
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
        ``engine_name`` ("auto", "hf" or "scratch", default ENGINE) picks whose forward pass
        runs: transformers' or our from-scratch transformer on the same weights (see
        ``src.models.inference`` for "auto", PRECISION and QUANTIZE).

        With BACKEND=remote no model is loaded: replies come from REMOTE_BASE_URL, and
        ``model_name`` (the CLI's --model) overrides REMOTE_MODEL. Local-only choices (an
        adapter, the scratch engine) are refused with ``ConfigError``.
        """
        if settings.backend == "remote":
            if adapter_path is not None or engine_name not in (None, "auto"):
                raise ConfigError(
                    "LoRA adapters and --engine need a local model, but BACKEND=remote loads "
                    "none; drop them or use BACKEND=local"
                )
            backend = RemoteBackend.from_settings(settings, model=model_name)
            return cls(backend, model_name=backend.model, store=store, **service_options(settings))

        from src.models.inference import load_for_inference

        loaded = load_for_inference(settings, model_name, adapter_path, engine_name)
        logger.info("Model: %s (%s)", loaded.name, loaded.description)
        name, model = loaded.name, loaded.model
        if batching and not supports_batching(model):
            logger.warning(
                "Notice: %s uses sliding-window attention; requests will not be batched together.",
                name,
            )
            batching = False
        prefix_cache = (
            PrefixCache(settings.prefix_cache_mb * 2**20) if settings.prefix_cache_mb else None
        )
        if batching:
            engine = BatchingEngine(
                model, loaded.tokenizer, settings.max_batch_size, prefix_cache=prefix_cache
            )
        else:
            engine = HFEngine(model, loaded.tokenizer, prefix_cache=prefix_cache)
        return cls(engine, model_name=name, store=store, **service_options(settings))

    @property
    def supports_system_prompt(self) -> bool:
        return self.backend.supports_system_prompt

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
        messages = conversation.messages + [{"role": "user", "content": user_message}]
        prompt = self.backend.build_prompt(conversation.system_prompt, messages, params)
        return ReplyStream(self, conversation, user_message, prompt, params)

    def reply(
        self,
        conversation: Conversation,
        user_message: str,
        params: GenerationParams | None = None,
    ) -> ChatResult:
        """Generate a whole reply (no streaming)."""
        return self.start_reply(conversation, user_message, params).complete()

    def cache_key(self, prompt: Any, params: GenerationParams) -> tuple | None:
        """The cache key for a deterministic request, or None for a sampled one."""
        if not params.is_greedy:
            return None
        return cache_key(self.model_name, self.backend.cache_material(prompt), params)


def service_options(settings: Settings) -> dict[str, Any]:
    """The ChatService arguments that come from the settings, whatever the backend."""
    return {
        "default_params": settings.generation_defaults(),
        "max_length": settings.max_length,
        "cache_size": settings.response_cache_size,
        "default_system_prompt": settings.system_prompt,
        "max_message_chars": settings.max_message_chars,
    }
