"""A clean shutdown for the API server.

On SIGTERM (or Ctrl-C) uvicorn stops listening and waits for the open responses to end, then
runs the app's shutdown. Streams can run for minutes, so on its own that wait has no bound.
``GracefulShutdown`` adds one: from the signal on, new requests get 503; replies in flight
may finish for SHUTDOWN_GRACE_SECONDS; then every reply still running is interrupted. Each
ends with a final event that says so (an ``error`` event of type ``server_shutdown``; a
non-streamed request gets 503), nothing of it is saved, and every completed exchange already
is (an exchange is written in one transaction when its reply completes). Then the app's
shutdown closes the chat stack: engine threads stop and the sessions database is closed.

uvicorn installs its signal handlers before the app starts; ours calls theirs after noting
the signal, so uvicorn's own shutdown still runs as usual.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from src.chat.adapter_pool import AdapterPool

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
POLL_SECONDS = 0.1


class GracefulShutdown:
    """Started by a signal (or ``begin()``): drain, then interrupt what is left."""

    def __init__(self, grace_seconds: float, get_pool: Callable[[], AdapterPool | None]) -> None:
        self.grace_seconds = grace_seconds
        self.get_pool = get_pool
        self.draining = threading.Event()
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Chain our handler in front of the current one (uvicorn's). Only the main thread
        may set signal handlers: elsewhere (an app run inside a test's thread) call
        ``begin()`` directly."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.begin()
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)

    def begin(self) -> None:
        """Refuse new requests from now on, and interrupt the replies still running after
        the grace period (in a thread: a signal handler must return at once)."""
        if self.draining.is_set():
            return
        self.draining.set()
        logger.info("Shutting down: replies in flight have %.0f s to finish", self.grace_seconds)
        threading.Thread(target=self._drain, name="graceful-shutdown", daemon=True).start()

    def _drain(self) -> None:
        stopped = threading.Event()
        waited = 0.0
        while waited < self.grace_seconds and self.in_flight():
            stopped.wait(POLL_SECONDS)
            waited += POLL_SECONDS
        pool = self.get_pool()
        interrupted = sum(service.interrupt_all() for service in pool.services()) if pool else 0
        if interrupted:
            logger.warning("Grace period over: %d replies interrupted", interrupted)

    def in_flight(self) -> int:
        pool = self.get_pool()
        return sum(service.replies_in_flight() for service in pool.services()) if pool else 0


class RefuseWhileDraining:
    """ASGI middleware: once shutdown began, new HTTP requests get 503 (``/health`` too), so a
    keep-alive connection cannot start a reply that would be cut off."""

    def __init__(self, app: ASGIApp, shutdown: GracefulShutdown) -> None:
        self.app = app
        self.shutdown = shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.shutdown.draining.is_set():
            await self.app(scope, receive, send)
            return
        from src.web.errors import error_response

        response = error_response(
            503, "the server is shutting down", "server_shutdown", headers={"Connection": "close"}
        )
        await response(scope, receive, send)
