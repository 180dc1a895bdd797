"""The FastAPI server: ``uvicorn src.web.api:app --port 8000`` (or ``make serve``).

The model loads once, in a background thread started by the lifespan, so the server answers
at once: ``/health`` says 503 "loading" until the model is ready. Routes get the ChatService
through ``Depends(get_service)``; tests build an app around their own service with
``create_app(service_factory=...)``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from src.chat.adapter_pool import AdapterPool
from src.chat.service import ChatService
from src.chat.store import SessionStore
from src.config import Settings, load_settings
from src.errors import MiniClaudeError
from src.web.errors import BodySizeLimit, install_error_handlers
from src.web.routes import chat, health, openai
from src.web.security import APIKeyGuard, ClientSlots

logger = logging.getLogger(__name__)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the UI never calls home

ServiceFactory = Callable[[Settings], ChatService]


def default_service_factory(settings: Settings) -> ChatService:
    """The configured model with batched decoding and sessions in SQLite."""
    return ChatService.from_settings(
        settings, batching=True, store=SessionStore(settings.sessions_db)
    )


def create_app(
    settings: Settings | None = None,
    service_factory: ServiceFactory | None = None,
    mount_ui: bool = True,
) -> FastAPI:
    settings = settings or load_settings()
    factory = service_factory or default_service_factory

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        def load() -> None:
            try:
                service = factory(settings)
                app.state.adapters = AdapterPool(
                    service, settings.adapters_dir, lambda path: adapter_service(service, path)
                )
                app.state.service = service
                logger.info("Model %s ready", service.model_name)
            except MiniClaudeError as exc:
                app.state.load_error = str(exc)
                logger.error("Model failed to load: %s", exc)
            except Exception as exc:  # anything else must not leave /health "loading" forever
                app.state.load_error = f"{type(exc).__name__}: {exc}"
                logger.exception("Model failed to load")

        def adapter_service(base: ChatService, adapter: Path) -> ChatService:
            return ChatService.from_settings(
                settings, adapter_path=adapter, batching=True, store=base.store
            )

        loader = threading.Thread(target=load, name="model-loader", daemon=True)
        loader.start()
        yield
        service = app.state.service
        if service is not None and service.store is not None:
            service.store.close()

    app = FastAPI(
        title="Mini-Claude API",
        version="0.1.0",
        description="Chat with a local model: native /chat routes with sessions, and an "
        "OpenAI-compatible /v1 API.",
        lifespan=lifespan,
        debug=settings.debug,
    )
    app.state.settings = settings
    app.state.service = None
    app.state.adapters = None  # an AdapterPool once the model is loaded (used by the UI)
    app.state.load_error = None
    app.state.slots = ClientSlots(settings.max_streams_per_client)
    install_error_handlers(app)
    # Middleware added last runs first: CORS (answers preflights, labels every answer), then
    # the API key (before any body is read), then the body size limit.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(APIKeyGuard, api_key=settings.api_key)
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key"],
        )
    app.include_router(health.router)
    app.include_router(chat.router)
    app.include_router(openai.router)
    if mount_ui:
        mount_web_ui(app, settings)
    return app


def mount_web_ui(app: FastAPI, settings: Settings) -> None:
    """The Gradio UI at /ui. With API_KEY set, APIKeyGuard keeps every path under /ui behind
    the key: the browser asks for it (HTTP Basic: any user name, the key as the password) and
    sends it with each of the page's requests, so no part of Gradio is reachable without it."""
    import gradio as gr

    from src.web.ui import build_ui, enable_queue

    ui = build_ui(lambda: app.state.adapters, settings.generation_defaults())
    enable_queue(ui, settings.max_batch_size)
    gr.mount_gradio_app(app, ui, path="/ui")


app = create_app()
