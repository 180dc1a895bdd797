"""A clean shutdown for the API server.

On SIGTERM (or Ctrl-C) uvicorn stops listening and waits for the open responses to end, then
runs the app's shutdown. Streams can run for minutes, so on its own that wait has no bound.
``GracefulShutdown`` adds one: from the signal on, new requests get 503; requests in flight
may finish for SHUTDOWN_GRACE_SECONDS; then every reply still running (or starting: a request
already past the door) is interrupted. Each ends with a final event that says so (an
``error`` event of type ``server_shutdown``; a request that was not streamed gets 503),
nothing of it is saved, and every completed exchange already is (an exchange is written in
one transaction when its reply completes). Then uvicorn runs the app's shutdown, which
closes the chat stack: engine threads stop and the sessions database is closed.

A second signal during the grace period (an impatient operator, or Ctrl-C twice) ends it at
once: every reply still running is interrupted now, in the same way (the documented error
shape, nothing saved), and the server exits as soon as those answers are out. It is not passed
on to uvicorn, whose forced exit would drop the connections without an answer while replies
that were not streamed go on generating (and saving) in their threads. A third signal is
passed on: uvicorn's forced exit, for a server that is stuck.

uvicorn installs its signal handlers before the app starts; ours, installed at start-up,
notes the signal and calls theirs, so uvicorn's own shutdown runs as usual. A signal handler
must not take locks the interrupted code may hold (starting a thread does), so the handler
only sets an event; a thread started with the app does the waiting.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from src.chat.adapter_pool import AdapterPool
from src.web.errors import error_response
from src.web.protocols import route_path

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
POLL_SECONDS = 0.05


class GracefulShutdown:
    """Started by a signal (or ``begin()``): drain, then interrupt what is left."""

    def __init__(self, grace_seconds: float, get_pool: Callable[[], AdapterPool | None]) -> None:
        self.grace_seconds = grace_seconds
        self.get_pool = get_pool
        self.draining = threading.Event()
        self.forced = threading.Event()  # a second signal: no more grace
        self._signals = 0
        self._stopped = False  # the app ended without a signal: nothing to drain
        self._requests = 0  # HTTP requests in flight (counted by ShutdownGate)
        self._count_lock = threading.Lock()
        self._previous: dict[int, Any] = {}

    # ---- start-up and the app's own shutdown ------------------------------------------------

    def install(self) -> None:
        """Start the drain thread, and chain our signal handler in front of the current one
        (uvicorn's). Only the main thread may set signal handlers: an app run in a test's
        thread is drained by calling ``begin()``."""
        threading.Thread(target=self._drain, name="graceful-shutdown", daemon=True).start()
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if not self.draining.is_set():
            self._stopped = True
            self.draining.set()  # wakes the drain thread, which then just ends

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        self.draining.set()
        if self._signals == 2:
            self.forced.set()
            return
        previous = self._previous.get(signum)
        if callable(previous):
            # From the third on, as Ctrl-C: uvicorn forces its exit only for SIGINT.
            previous(signum if self._signals == 1 else signal.SIGINT, frame)

    def begin(self) -> None:
        """Refuse new requests from now on and interrupt what still runs after the grace
        period (what a signal does)."""
        self.draining.set()

    # ---- the drain thread -------------------------------------------------------------------

    def _drain(self) -> None:
        self.draining.wait()
        if self._stopped:
            return
        logger.info("Shutting down: requests in flight have %.0f s to finish", self.grace_seconds)
        deadline = time.monotonic() + self.grace_seconds
        while self.requests_in_flight() and time.monotonic() < deadline:
            if self.forced.wait(POLL_SECONDS):
                logger.warning("Second signal: interrupting the replies in flight now")
                break
        pool = self.get_pool()
        interrupted = sum(service.interrupt_all() for service in pool.services()) if pool else 0
        if interrupted:
            logger.warning("Grace period over: %d replies interrupted", interrupted)

    def requests_in_flight(self) -> int:
        return self._requests

    def request_started(self) -> None:
        with self._count_lock:
            self._requests += 1

    def request_ended(self) -> None:
        with self._count_lock:
            self._requests -= 1


class ShutdownGate:
    """ASGI middleware: counts the HTTP requests in flight (the drain waits for them), and
    once shutdown began answers new ones with 503 (``/health`` too), so a keep-alive
    connection cannot start a reply that would be cut off."""

    def __init__(self, app: ASGIApp, shutdown: GracefulShutdown) -> None:
        self.app = app
        self.shutdown = shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.shutdown.draining.is_set():
            response = error_response(
                503,
                "the server is shutting down",
                "server_shutdown",
                headers={"Connection": "close"},
                path=route_path(scope),
            )
            await response(scope, receive, send)
            return
        self.shutdown.request_started()
        try:
            await self.app(scope, receive, send)
        finally:
            self.shutdown.request_ended()
