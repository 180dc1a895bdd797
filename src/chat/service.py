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

import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from src.chat.cache import CachedReply, ResponseCache, cache_key
from src.chat.conversation import Conversation
from src.chat.deltas import Delta, TokenInfo
from src.chat.feedback import FeedbackStore
from src.chat.feedback_records import Generation
from src.chat.local import LocalBackend
from src.chat.remote import RemoteBackend
from src.chat.store import SessionStore, check_reply_index
from src.chat.tools import ToolCall, ToolSet
from src.errors import InvalidRequestError, ServerShuttingDownError, SessionNotFoundError
from src.params import MAX_NEW_TOKENS, GenerationParams, check_reply_length


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
    tool_calls: list[ToolCall] = field(default_factory=list)  # finish_reason "tool_calls"
    logprobs: list[TokenInfo] | None = None  # with params.logprobs: one per reply token
    prompt_logprobs: list[TokenInfo] | None = None  # with params.prompt_logprobs
    stop_sequence: str | None = None  # the stop sequence that ended the reply, if one did

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


class ReplyStream:
    """One reply being generated. Iterate once, for text deltas (or ``deltas()``, for
    ``Delta`` objects with log-probabilities and tool calls); ``cancel()`` from anywhere
    (a signal handler, another thread) stops it after the current token.

    The exchange is added to the conversation (and to the session store, if the service has
    one) when generation ends, including when it was cancelled: the partial reply is kept, as
    in other chat UIs. A stream that is abandoned (``abandon()``, or closed before it ends,
    e.g. a web client that went away) changes nothing. A stream that is interrupted
    (``interrupt()``: the server is shutting down) changes nothing either, and ends by raising
    ``ServerShuttingDownError``. A stream that was started must be iterated or abandoned: with
    a remote backend it holds an open response.
    """

    def __init__(
        self,
        service: ChatService,
        conversation: Conversation | None,
        user_message: str | None,
        prompt: Any,
        params: GenerationParams,
        cacheable: bool = True,
        release_session: Callable[[], None] | None = None,
    ) -> None:
        self.service = service
        self.conversation = conversation
        self.user_message = user_message
        self.prompt = prompt  # the backend's: token ids (local) or messages (remote)
        self.params = params
        self.result: ChatResult | None = None
        self._cancelled = threading.Event()
        self._abandoned = False
        self._interrupted = False
        self._started = False  # iter() was called
        self._running = False  # the generator's body began (so its ``finally`` will run)
        self._started_at = time.perf_counter()
        # The stored session this reply continues is reserved until the reply has ended (saved
        # or not). A stream dropped without being iterated stops its generation and gives the
        # session back when collected.
        self._release_session = release_session or (lambda: None)
        # Set by ``ChatService.start_candidate``: (session id, message index) this reply is
        # another candidate for, and the id of its record once it has ended.
        self.candidate_for: tuple[str, int] | None = None
        self.candidate_id: int | None = None
        weakref.finalize(self, _dropped, self._cancelled, self._release_session)
        self._key = service.cache_key(prompt, params) if cacheable else None
        self._cached = service.cache.get(self._key) if self._key is not None else None
        # The generation starts now (nothing runs locally until iterated; a remote request is
        # sent, so a server that cannot be reached raises here, before any text streams).
        self._generation = None
        if self._cached is None:
            self._generation = service.backend.start(prompt, params, self._cancelled.is_set)
        service._track(self, running=True)

    @property
    def prompt_tokens(self) -> int | None:
        """The prompt's length in tokens, known before the reply starts (None where only the
        end of a remote reply tells)."""
        if self._cached is not None:
            return self._cached.prompt_tokens
        return self.service.backend.prompt_tokens(self.prompt)

    @property
    def generation(self) -> Generation:
        """How this reply is made (recorded with it, so that feedback on it is reproducible)."""
        return self.service.generation(self.params)

    def cancel(self) -> None:
        """Stop after the current token; the partial reply is kept."""
        self._cancelled.set()

    def abandon(self) -> None:
        """Stop after the current token and keep nothing (the client is gone)."""
        self._abandoned = True
        self._cancelled.set()
        if not self._running:
            self.service._track(self, running=False)
            self._release_session()
            if self._generation is not None:
                # Never iterated: drop it now, without waiting (this may be the event loop).
                self._generation.abandon()

    def interrupt(self) -> None:
        """Stop after the current token, keep nothing, and end by raising
        ``ServerShuttingDownError`` (the server is shutting down)."""
        self._interrupted = True
        self._cancelled.set()

    def __iter__(self) -> Iterator[str]:
        return self._texts(self.deltas())

    @staticmethod
    def _texts(deltas: Iterator[Delta]) -> Iterator[str]:
        try:
            for delta in deltas:
                if delta.text:
                    yield delta.text
        finally:
            deltas.close()

    def deltas(self) -> Iterator[Delta]:
        if self._started:
            raise RuntimeError("a ReplyStream can be iterated only once")
        self._started = True
        return self._generate()

    def complete(self) -> ChatResult:
        """Generate the whole reply without streaming and return the result."""
        for _ in self.deltas():
            pass
        assert self.result is not None
        return self.result

    def _generate(self) -> Iterator[Delta]:
        self._running = True
        try:
            yield from self._generate_tracked()
        finally:
            self.service._track(self, running=False)
            self._release_session()

    def _generate_tracked(self) -> Iterator[Delta]:
        cached = self._cached
        if cached is not None:
            yield Delta(cached.text)
            self._finish(cached, None, cached=True)
            return

        generation = self._generation
        pieces: list[str] = []
        logprobs: list[TokenInfo] = []
        try:
            for delta in generation:
                pieces.append(delta.text)
                logprobs += delta.logprobs
                yield delta
        finally:
            generation.close()
        finish_reason = generation.finish_reason
        if finish_reason == "length" and self._cancelled.is_set():
            finish_reason = "cancelled"
        reply = CachedReply(
            "".join(pieces),
            generation.completion_tokens,
            finish_reason,
            generation.prompt_tokens,
            generation.stop_sequence,
        )
        if self._key is not None and finish_reason != "cancelled":
            self.service.cache.put(self._key, reply)
        first_token_at = generation.first_token_at
        first_token_seconds = None if first_token_at is None else first_token_at - self._started_at
        tool_calls = list(getattr(generation, "tool_calls", []))
        extras = {
            "tool_calls": tool_calls,
            "logprobs": logprobs if self.params.logprobs else None,
            "prompt_logprobs": generation.prompt_logprobs if self.params.prompt_logprobs else None,
        }
        self._finish(reply, first_token_seconds, extras=extras)

    def _finish(
        self,
        reply: CachedReply,
        first_token_seconds: float | None,
        cached: bool = False,
        extras: dict[str, Any] | None = None,
    ) -> None:
        if self._abandoned:
            return
        if self._interrupted and reply.finish_reason == "cancelled":
            raise ServerShuttingDownError(
                f"the server is shutting down: this reply was stopped after "
                f"{reply.completion_tokens} tokens and not saved; send the message again once "
                "the server is back"
            )
        conversation = self.conversation
        tool_calls = (extras or {}).get("tool_calls") or []
        # What the reply answered: the messages its prompt held (the oldest may have been
        # left out to fit the context window), up to the user's turn.
        seen = self.prompt.dropped_messages
        if conversation is not None and self.user_message is not None:
            conversation.add_exchange(self.user_message, reply.text)
            if conversation.persistent and self.service.store is not None:
                answered = conversation.messages[seen:-1]
                record = self.service.feedback.recorder(
                    conversation.id, conversation.system_prompt, answered, self.generation
                )
                self.service.store.append_exchange(
                    conversation, self.user_message, reply.text, also=record
                )
        elif conversation is not None:  # the input was already in the conversation
            conversation.messages.append(assistant_message(reply.text, tool_calls))
        if self.candidate_for is not None:
            session_id, index = self.candidate_for
            context = conversation.messages[seen:-1]
            record = self.service.feedback.add_candidate(
                session_id, index, reply.text, self.generation, conversation.system_prompt, context
            )
            self.candidate_id = record.id
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
            stop_sequence=reply.stop_sequence,
            **(extras or {}),
        )
        for observe in self.service.result_observers:
            observe(self.result)


def _dropped(cancelled: threading.Event, release_session: Callable[[], None]) -> None:
    """A ReplyStream was garbage-collected: its generation (if any) stops, its session is free."""
    cancelled.set()
    release_session()


def assistant_message(text: str, tool_calls: list[ToolCall]) -> dict[str, Any]:
    """A reply as a message of the conversation (OpenAI's shape)."""
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in tool_calls
        ]
    elif message["content"] is None:
        message["content"] = ""
    return message


def check_text(field: str, text: str) -> None:
    """Reject text that is not valid Unicode (a lone surrogate such as JSON's "\ud800"):
    tokenizers and SQLite cannot take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{field}: invalid Unicode (a lone surrogate) at character {exc.start}", field
        ) from None


class ChatService:
    """Built by the composition root (``src/stack.py``) from the settings; tests build it
    around their own backend."""

    def __init__(
        self,
        backend: LocalBackend | RemoteBackend,
        model_name: str,
        default_params: GenerationParams | None = None,
        cache_size: int = 256,
        default_system_prompt: str | None = None,
        store: SessionStore | None = None,
        max_message_chars: int = 16_000,
        max_reply_tokens: int = MAX_NEW_TOKENS,
        adapter_name: str | None = None,
    ) -> None:
        self.backend = backend
        self.adapter_name = adapter_name  # the LoRA adapter on the model, if any
        self.max_reply_tokens = max_reply_tokens  # MAX_LENGTH
        self.max_message_chars = max_message_chars
        self.store = store  # where sessions persist (the API's SQLite file); None in the CLI
        self.model_name = model_name
        self.default_params = default_params or GenerationParams()
        self.default_system_prompt = default_system_prompt
        self.cache = ResponseCache(cache_size)
        # Called with each finished reply's result (the server's metrics); an adapter's
        # service shares its base service's list.
        self.result_observers: list[Callable[[ChatResult], None]] = []
        # Replies started and not ended (for shutdown, and so an adapter in use is not closed);
        # weak, so a stream dropped without being iterated does not count for ever.
        self._streams: weakref.WeakSet[ReplyStream] = weakref.WeakSet()
        self._streams_lock = threading.Lock()
        self._shutting_down = False  # set by interrupt_all: later replies stop at once

    def close(self) -> None:
        """Stop the backend (the engine's thread, or the remote client's connections). The
        session store is the composition root's: it may be shared by several services."""
        self.backend.close()

    def interrupt_all(self) -> int:
        """End every reply still being generated (the server is shutting down): each stops
        after its current token, is not saved, and ends by raising ``ServerShuttingDownError``.
        So do replies that start later (a request that was already past the door). Returns
        how many were running."""
        with self._streams_lock:
            self._shutting_down = True
            streams = list(self._streams)
        for stream in streams:
            stream.interrupt()
        return len(streams)

    def running_replies(self) -> int:
        """Replies started and not ended, queued ones included (an adapter's service with
        none may be closed)."""
        with self._streams_lock:
            return len(self._streams)

    def _track(self, stream: ReplyStream, running: bool) -> None:
        with self._streams_lock:
            if not running:
                self._streams.discard(stream)
                return
            self._streams.add(stream)
            if self._shutting_down:
                stream.interrupt()

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

    def start_candidate(
        self, session_id: str, index: int, params: GenerationParams | None = None
    ) -> ReplyStream:
        """Another reply to the message a session's reply ``index`` answers, from the same
        context. The session is unchanged: the reply is recorded as a candidate when it ends
        (``stream.candidate_id``), to be chosen (or not) with feedback."""
        session = self.get_session(session_id)
        if session is None:
            raise SessionNotFoundError(f"session_id: no session {session_id!r}", "session_id")
        check_reply_index(session.messages, index)
        earlier = Conversation(session.system_prompt, session.messages[: index - 1])
        stream = self.start_reply(earlier, session.messages[index - 1]["content"], params)
        stream.candidate_for = (session_id, index)
        return stream

    @property
    def feedback(self) -> FeedbackStore:
        """Replies and the judgements of them, in the session store's file."""
        if self.store is None:
            raise RuntimeError("this ChatService has no session store")
        return FeedbackStore.of(self.store)

    def generation(self, params: GenerationParams) -> Generation:
        return Generation(self.model_name, self.adapter_name, params.model_dump(mode="json"))

    def start_reply(
        self,
        conversation: Conversation,
        user_message: str | None,
        params: GenerationParams | None = None,
        tools: ToolSet | None = None,
    ) -> ReplyStream:
        """Validate and build the prompt now (errors raise here, before any text streams).
        ``user_message`` None: the conversation already ends with what the model answers (a
        client that sends the whole conversation: OpenAI's API)."""
        return self.start_replies(conversation, user_message, params, tools=tools)[0]

    def start_replies(
        self,
        conversation: Conversation,
        user_message: str | None,
        params: GenerationParams | None = None,
        n: int = 1,
        tools: ToolSet | None = None,
    ) -> list[ReplyStream]:
        """``n`` independent replies to the same prompt (OpenAI's ``n``), built once. With a
        seed, reply i samples with seed + i, so the set is reproducible."""
        params = self._check_params(params)
        if params.max_new_tokens < 1:
            raise InvalidRequestError(
                "max_new_tokens: a reply needs at least 1 token (0, only scoring the prompt, "
                "is for /v1/completions)",
                "max_new_tokens",
            )
        self._check_messages(conversation, user_message)
        messages = list(conversation.messages)
        if user_message is not None:
            messages.append({"role": "user", "content": user_message})
        prompt = self.backend.build_prompt(conversation.system_prompt, messages, params, tools)
        cacheable = n == 1 and (tools is None or not tools.active)
        stored = conversation.persistent and self.store is not None and user_message is not None
        release = self.store.claim(conversation) if stored else None
        try:
            with self.backend.together(n):
                return [
                    ReplyStream(self, conversation, user_message, prompt, each, cacheable, release)
                    for each in _choices(params, n)
                ]
        except BaseException:
            if release is not None:
                release()
            raise

    def start_completions(
        self, prompts: list[str | list[int]], params: GenerationParams | None = None, n: int = 1
    ) -> list[ReplyStream]:
        """Replies continuing raw prompts (text or token ids), with no chat template and no
        conversation (legacy completions): ``n`` per prompt, prompt by prompt, all queued
        together as one batch."""
        params = self._check_params(params)
        build = getattr(self.backend, "build_raw_prompt", None)
        if build is None:
            raise InvalidRequestError(
                "prompt: raw completions need a local model (BACKEND=local)", "prompt"
            )
        built = []
        for prompt in prompts:
            if isinstance(prompt, str):
                check_text("prompt", prompt)
            built.append(build(prompt, params))
        with self.backend.together(len(built) * n):
            return [
                ReplyStream(self, None, None, prompt, each, n == 1)
                for prompt in built
                for each in _choices(params, n)
            ]

    def _check_params(self, params: GenerationParams | None) -> GenerationParams:
        params = params or self.default_params
        check_reply_length(params.max_new_tokens, "max_new_tokens", self.max_reply_tokens)
        return params

    def _check_messages(self, conversation: Conversation, user_message: str | None) -> None:
        if user_message is None:
            if not conversation.messages:
                raise InvalidRequestError("messages: must not be empty", "messages")
        elif not isinstance(user_message, str) or not user_message.strip():
            raise InvalidRequestError("message: must not be empty", "message")
        else:
            check_text("message", user_message)
            if len(user_message) > self.max_message_chars:
                raise InvalidRequestError(
                    f"message: {len(user_message)} characters is over the limit of "
                    f"{self.max_message_chars} (MAX_MESSAGE_CHARS)",
                    "message",
                )
        check_text("system_prompt", conversation.system_prompt or "")
        for message in conversation.messages:
            check_text("messages", message.get("content") or "")

    def reply(
        self,
        conversation: Conversation,
        user_message: str,
        params: GenerationParams | None = None,
    ) -> ChatResult:
        """Generate a whole reply (no streaming)."""
        return self.start_reply(conversation, user_message, params).complete()

    # ---- tokens (vLLM's /tokenize and /detokenize; echo in legacy completions) --------------

    @property
    def context_window(self) -> int | None:
        return self.backend.context_window

    def _local(self, what: str) -> LocalBackend:
        if not isinstance(self.backend, LocalBackend):
            raise InvalidRequestError(f"{what}: needs a local model (BACKEND=local)", what)
        return self.backend

    @property
    def is_remote(self) -> bool:
        return isinstance(self.backend, RemoteBackend)

    def forward(self, route: str, body: dict[str, Any]) -> Any:
        """BACKEND=remote: send a request the remote server answers itself (legacy
        completions, the tokenizer routes) and return its streamed ``httpx.Response``."""
        if not isinstance(self.backend, RemoteBackend):
            raise RuntimeError("forward() is for BACKEND=remote")
        return self.backend.forward(route, body)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_text("prompt", text)
        return self._local("prompt").tokenize(text, add_special_tokens)

    def detokenize(self, token_ids: list[int]) -> str:
        return self._local("tokens").detokenize(token_ids)

    def render(
        self,
        conversation: Conversation,
        generation_prompt: bool = True,
        tools: ToolSet | None = None,
    ) -> list[int]:
        """The token ids the model would see for a conversation (nothing dropped)."""
        self._check_messages(conversation, None)
        return self._local("messages").render(
            conversation.system_prompt, conversation.messages, generation_prompt, tools
        )

    def cache_key(self, prompt: Any, params: GenerationParams) -> tuple | None:
        """The cache key for a deterministic request, or None for a sampled one, or one whose
        result holds more than text (log-probabilities)."""
        if not params.is_greedy or params.logprobs or params.prompt_logprobs:
            return None
        return cache_key(self.model_name, self.backend.cache_material(prompt), params)


def _choices(params: GenerationParams, n: int) -> list[GenerationParams]:
    """Each choice's parameters: with a seed, choice i uses seed + i (so choices differ and the
    whole set is reproducible); without one, each draws from a fresh generator."""
    if n == 1 or params.seed is None:
        return [params] * n
    return [params.updated(seed=(params.seed + index) % 2**63) for index in range(n)]
