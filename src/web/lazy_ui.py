"""The Gradio UI at /ui, built when a browser first asks for it.

Importing Gradio (and pandas with it) adds about 115 MB to the server's resident memory, so
a server that only answers the API never pays for it: the mount at /ui is this wrapper, and
the first request to it imports Gradio and builds the page in a worker thread (the event
loop keeps serving the API meanwhile), starts Gradio's queue, and from then on passes every
request through. The server's lifespan closes it (``close``) at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.routing import BaseRoute, Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from src.web.errors import QuietClientErrors

if TYPE_CHECKING:
    import gradio as gr

logger = logging.getLogger(__name__)

UI_PATH = "/ui"


class LazyWebUI:
    """ASGI app mounted at ``UI_PATH`` in ``parent``; ``build_page`` makes the Gradio page
    (it runs once, on the first request)."""

    def __init__(self, parent: FastAPI, build_page: Callable[[], gr.Blocks]) -> None:
        self._parent = parent
        self._build_page = build_page
        self._app: ASGIApp | None = None
        self._inner_routes: list[BaseRoute] = []
        self._lifespan: AbstractAsyncContextManager[Any] | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def routes(self) -> list[BaseRoute]:
        """Gradio's routes once the UI is built (empty before), as a Mount lists them."""
        return self._inner_routes

    @property
    def built(self) -> bool:
        return self._app is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self._app or await self._build()
        await app(scope, receive, send)

    async def _build(self) -> ASGIApp:
        async with self._lock:  # concurrent first requests build it once
            if self._app is not None:
                return self._app
            if self._closed:
                raise RuntimeError("the server is shutting down")
            logger.info("Loading the web UI (first request to %s)", UI_PATH)
            holder, mount = await asyncio.to_thread(self._mount_page)
            # The holder's lifespan is Gradio's: it starts the queue that streams replies.
            lifespan = holder.router.lifespan_context(holder)
            await lifespan.__aenter__()
            self._lifespan = lifespan
            self._inner_routes = mount.routes
            self._app = QuietClientErrors(mount.app)
            return self._app

    def _mount_page(self) -> tuple[FastAPI, Mount]:
        """Import Gradio, build the page and mount it (all of it slow: off the event loop)."""
        import gradio

        page = self._build_page()
        # Gradio mounts its app into a FastAPI parent; this one only holds it, and lends
        # Gradio the server's middleware list, which Gradio reads to see whether the server
        # already answers CORS itself.
        holder = FastAPI()
        holder.user_middleware = self._parent.user_middleware
        gradio.mount_gradio_app(holder, page, path=UI_PATH)
        mount = next(r for r in holder.routes if isinstance(r, Mount) and r.path == UI_PATH)
        return holder, mount

    async def close(self) -> None:
        """Stop Gradio's queue if the UI was ever built; a failure there is logged, so that
        the rest of the server's shutdown still runs."""
        async with self._lock:  # after a build in progress, which then is not started
            self._closed = True
            lifespan, self._lifespan = self._lifespan, None
        if lifespan is None:
            return
        try:
            await lifespan.__aexit__(None, None, None)
        except Exception:
            logger.exception("Closing the web UI failed")
