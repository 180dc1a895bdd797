"""The FastAPI server: ``uvicorn src.web.api:app --port 8000`` (or ``make serve``).

The model loads once, in a background thread started by the lifespan, so the server answers
at once: ``/health`` says 503 "loading" until the model is ready. The chat stack comes from
the composition root (``src/stack.py``); tests build an app around their own stack with
``create_app(stack_factory=...)``. On SIGTERM the server drains (``src/web/lifecycle.py``),
then closes the stack.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from src.config import Settings, load_settings
from src.errors import MiniClaudeError
from src.stack import ChatStack, build_chat_stack
from src.web.errors import RequestLimits, install_error_handlers
from src.web.lazy_ui import UI_PATH, LazyWebUI
from src.web.lifecycle import GracefulShutdown, ShutdownGate
from src.web.metrics import RequestObserver, ServerMetrics, configure_request_log
from src.web.routes import anthropic, chat, completions, health, ollama, openai, sessions
from src.web.routes import metrics as metrics_route
from src.web.routes.metrics import METRICS_PATH
from src.web.security import OPEN_PATHS, APIKeyGuard, ClientSlots

logger = logging.getLogger(__name__)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the UI never calls home

StackFactory = Callable[[Settings], ChatStack]


def default_stack_factory(settings: Settings) -> ChatStack:
    """The configured model, with sessions in SQLite."""
    return build_chat_stack(settings, sessions=True)


def create_app(
    settings: Settings | None = None,
    stack_factory: StackFactory | None = None,
    mount_ui: bool = True,
) -> FastAPI:
    settings = settings or load_settings()
    factory = stack_factory or default_stack_factory
    shutdown = GracefulShutdown(settings.shutdown_grace_seconds, lambda: app.state.adapters)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loaded = threading.Event()

        def load() -> None:
            try:
                stack = factory(settings)
                stack.service.result_observers.append(metrics.observe_reply)
                app.state.stack = stack
                app.state.adapters = stack.adapters
                app.state.service = stack.service
                logger.info("Model %s ready", stack.service.model_name)
            except MiniClaudeError as exc:
                app.state.load_error = str(exc)
                logger.error("Model failed to load: %s", exc)
            except Exception as exc:  # anything else must not leave /health "loading" forever
                app.state.load_error = f"{type(exc).__name__}: {exc}"
                logger.exception("Model failed to load")
            finally:
                loaded.set()

        shutdown.install()
        threading.Thread(target=load, name="model-loader", daemon=True).start()
        try:
            yield
        finally:
            # uvicorn runs this once every response has ended (a signal's drain bounded that).
            shutdown.uninstall()
            try:
                if app.state.ui is not None:
                    await app.state.ui.close()  # never raises: see LazyWebUI.close
            finally:
                if loaded.is_set() and app.state.stack is not None:
                    await asyncio.to_thread(app.state.stack.close)  # joins the engine threads

    app = FastAPI(
        title="Mini-Claude API",
        version="0.1.0",
        description="Chat with a local model: native /chat routes with sessions, and an "
        "OpenAI-compatible /v1 API.",
        lifespan=lifespan,
        debug=settings.debug,
    )
    app.state.settings = settings
    app.state.stack = None
    app.state.service = None
    app.state.adapters = None  # an AdapterPool once the model is loaded (used by the UI)
    app.state.load_error = None
    app.state.slots = ClientSlots(settings.max_streams_per_client)
    metrics = app.state.metrics = ServerMetrics()
    metrics.watch(app.state)
    install_error_handlers(app)
    # Middleware added last runs first: CORS (answers preflights, labels every answer), then
    # the request observer (an id, metrics and a log line for every request, refused ones
    # too), then the shutdown gate (counts requests in flight; 503 once shutting down), then
    # the API key (before any body is read), then the request's limits (header count, body
    # size and time).
    app.add_middleware(
        RequestLimits,
        max_body_bytes=settings.max_body_bytes,
        max_header_count=settings.max_header_count,
        body_timeout_seconds=settings.body_timeout_seconds,
    )
    open_paths = OPEN_PATHS | ({METRICS_PATH} if settings.metrics_public else set())
    app.add_middleware(APIKeyGuard, api_key=settings.api_key, open_paths=frozenset(open_paths))
    app.add_middleware(ShutdownGate, shutdown=shutdown)
    app.add_middleware(RequestObserver, metrics=metrics)
    configure_request_log(settings.log_format)
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key"],
        )
    app.include_router(health.router)
    app.include_router(metrics_route.router)
    app.include_router(chat.router)
    app.include_router(sessions.router)
    app.include_router(openai.router)
    app.include_router(completions.router)
    app.include_router(anthropic.router)
    app.include_router(ollama.router)
    app.state.ui = mount_web_ui(app, settings) if mount_ui else None
    return app


def mount_web_ui(app: FastAPI, settings: Settings) -> LazyWebUI:
    """The Gradio UI at /ui, built on its first request (``src/web/lazy_ui.py``). With API_KEY
    set, APIKeyGuard keeps every path under /ui behind the key: the browser asks for it (HTTP
    Basic: any user name, the key as the password) and sends it with each of the page's
    requests, so no part of Gradio is reachable without it."""

    def build_page():
        from src.web.ui import build_chat_page

        return build_chat_page(lambda: app.state.adapters, settings)

    ui = LazyWebUI(app, build_page)
    app.mount(UI_PATH, ui)
    return ui


app = create_app()
