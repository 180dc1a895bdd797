"""The API's security edge (README "Security"): the API key, checked for every path but
/health (the mounted UI and the OpenAPI docs included), and per-client limits on replies
being generated at once.

The key may be sent three ways, each compared in constant time (``hmac.compare_digest``):
``Authorization: Bearer <key>`` and ``X-API-Key: <key>`` for programs, and HTTP Basic (any
user name, the key as the password) for browsers, which ask for it on their own when /ui or
/docs answers 401 with a ``Basic`` challenge and then send it with every request of the page.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import SecretStr
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from src.errors import InvalidRequestError
from src.web.errors import HTTPProblem, error_response
from src.web.protocols import route_path

T = TypeVar("T")

OPEN_PATHS = frozenset({"/health"})  # the only path answered without the key
# Paths a person opens in a browser: their 401 asks the browser for a password (the key).
BROWSER_PREFIXES = ("/ui", "/docs", "/redoc", "/openapi.json")
API_KEY_HELP = "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
BROWSER_HELP = "; in a browser, log in with any user name and the key as the password"


def presented_keys(headers) -> list[str]:
    """Every key the request offers: a bearer token, an X-API-Key header, a Basic password."""
    keys = []
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        keys.append(value.strip())
    elif scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        _user, colon, password = decoded.partition(":")
        if colon:
            keys.append(password)
    if "x-api-key" in headers:
        keys.append(headers["x-api-key"].strip())
    return keys


def key_accepted(headers, expected: SecretStr | None) -> bool:
    """True when no key is configured, or when one of the presented keys is the key."""
    if expected is None:
        return True
    wanted = expected.get_secret_value().encode()
    matches = [hmac.compare_digest(key.encode(), wanted) for key in presented_keys(headers)]
    return any(matches)


def is_browser_path(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in BROWSER_PREFIXES)


def unauthorized(path: str):
    """401 in the project's error shape; browser paths ask for the key as a password."""
    browser = is_browser_path(path)
    challenge = 'Basic realm="Mini-Claude", charset="UTF-8"' if browser else "Bearer"
    message = API_KEY_HELP + (BROWSER_HELP if browser else "")
    return error_response(
        401, message, "authentication_error", headers={"WWW-Authenticate": challenge}, path=path
    )


class APIKeyGuard:
    """ASGI middleware: with API_KEY set, every HTTP request and websocket except /health
    needs the key, whatever route (or mounted app) would answer it. Being middleware, it
    also covers routes added later, the OpenAPI docs and everything under /ui."""

    def __init__(
        self, app: ASGIApp, api_key: SecretStr | None, open_paths: frozenset[str] = OPEN_PATHS
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.api_key is None or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path in self.open_paths or key_accepted(headers, self.api_key):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
        else:
            await unauthorized(path)(scope, receive, send)


# ---- concurrent replies per client -----------------------------------------------------------


def client_id(request: Request) -> str:
    """Who a limit applies to: the client's IP address (behind a reverse proxy, run uvicorn
    with --proxy-headers and --forwarded-allow-ips so this is the real client's)."""
    return request.client.host if request.client else "unknown"


def may_list_sessions(client_host: str | None, api_key: SecretStr | None) -> bool:
    """Whether a client may see the list of stored sessions. With API_KEY set, its holder
    (every request that got this far) may. On an open server (no key), only a client on this
    machine may: reached over the network, a session stays reachable only by its id (128
    random bits), as if it were a password."""
    if api_key is not None:
        return True
    if client_host is None:
        return False
    try:
        return ipaddress.ip_address(client_host).is_loopback
    except ValueError:
        return client_host == "localhost"


class ClientSlots:
    """At most ``limit`` replies being generated at once for each client; the next one gets
    429. A slot is taken before generation starts and given back when the reply ends, fails,
    or its client disconnects."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._active: dict[str, int] = {}
        self._lock = threading.Lock()

    def active(self, client: str) -> int:
        with self._lock:
            return self._active.get(client, 0)

    def acquire(self, client: str) -> Slot:
        with self._lock:
            count = self._active.get(client, 0)
            if count >= self.limit:
                raise HTTPProblem(
                    429,
                    f"too many concurrent requests: this client already has {count} "
                    f"repl{'y' if count == 1 else 'ies'} being generated, the limit "
                    f"(MAX_STREAMS_PER_CLIENT) is {self.limit}; wait for one to finish",
                    "rate_limit_exceeded",
                    headers={"Retry-After": "1"},
                )
            self._active[client] = count + 1
        return Slot(self, client)

    def _release(self, client: str) -> None:
        with self._lock:
            count = self._active.get(client, 0) - 1
            if count > 0:
                self._active[client] = count
            else:
                self._active.pop(client, None)

    @contextmanager
    def hold(self, client: str) -> Iterator[Slot]:
        slot = self.acquire(client)
        try:
            yield slot
        finally:
            slot.release()


class Slot:
    def __init__(self, slots: ClientSlots, client: str) -> None:
        self._slots = slots
        self._client = client
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        """Give the slot back (only the first call counts)."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self._slots._release(self._client)


async def start_in_slot(
    slots: ClientSlots, request: Request, start: Callable[..., T], *args: Any
) -> tuple[T, Slot]:
    """Take the client's slot (429 when it has none left), then ``start(*args)`` in a worker
    thread (starting replies builds their prompts); the slot goes back if they cannot start."""
    slot = slots.acquire(client_id(request))
    try:
        return await run_in_threadpool(start, *args), slot
    except BaseException:
        slot.release()
        raise


class SlotStreamingResponse(StreamingResponse):
    """A streaming response that gives its slot back however it ends: the last event sent,
    an error, or the client disconnecting (even before the first event). ``replies``: the
    reply streams it sends, abandoned when it ends, so that one whose client left before
    its first event (the event generator never started) does not generate for nobody."""

    def __init__(self, content, slot: Slot, replies: Sequence[Any] = (), **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.slot = slot
        self.replies = replies

    @classmethod
    def server_sent(
        cls, events: AsyncIterator[str], slot: Slot, replies: Sequence[Any]
    ) -> SlotStreamingResponse:
        """Server-sent events, as every streaming route but Ollama's sends them."""
        return cls(
            events,
            slot,
            replies=replies,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watched_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                # The client is gone: its slot is free now, not once its generation has
                # noticed (a client that cancels and retries at once gets no 429).
                self.slot.release()
            return message

        try:
            await super().__call__(scope, watched_receive, send)
        finally:
            self.slot.release()
            for reply in self.replies:
                reply.abandon()  # a reply that ended already keeps what it saved


# ---- request limits ------------------------------------------------------------------------


def check_history_length(count: int, limit: int) -> None:
    """400 for a conversation of more messages than MAX_HISTORY_MESSAGES."""
    if count > limit:
        raise InvalidRequestError(
            f"messages: {count} messages is over the limit of {limit} (MAX_HISTORY_MESSAGES); "
            "send fewer earlier turns",
            "messages",
        )


def check_chars(field: str, text: str | None, limit: int, param: str | None = None) -> None:
    """400 for a text (a system prompt, a message of the history) over MAX_MESSAGE_CHARS."""
    if text is not None and len(text) > limit:
        raise HTTPProblem(
            400,
            f"{field}: {len(text)} characters is over the limit of {limit} (MAX_MESSAGE_CHARS)",
            "invalid_request_error",
            param or field,
        )
