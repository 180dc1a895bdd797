"""HTTP edge: the core's exceptions become status codes, every error has the JSON shape of
the protocol its path speaks (``src/web/protocols.py``): ``{"error": {"message", "type",
"param"}}`` as in the OpenAI API (also on the project's own routes), ``{"type": "error",
"error": {"type", "message"}}`` under /v1/messages as in Anthropic's, ``{"error": message}``
under /api as in Ollama's. Bodies over the size limit are refused with 413 before they are
read into memory (``RequestLimits``)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from src.errors import (
    ContextOverflowError,
    InvalidRequestError,
    MiniClaudeError,
    RemoteBackendError,
    ServerBusyError,
    ServerShuttingDownError,
    SessionBusyError,
    SessionNotFoundError,
    StorageError,
)
from src.web.protocols import Protocol, protocol_of, route_path
from src.web.streaming import ClientGone

logger = logging.getLogger(__name__)


class HTTPProblem(Exception):
    """An error the web layer raises itself (unknown session, missing API key, ...)."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.headers = headers


# Anthropic's error types, by status (https://docs.anthropic.com/en/api/errors).
ANTHROPIC_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
}


def error_body(
    status: int, message: str, error_type: str, param: str | None, protocol: Protocol
) -> dict[str, Any]:
    """An error as ``protocol`` writes it."""
    if protocol == "anthropic":
        kind = ANTHROPIC_ERROR_TYPES.get(
            status, "invalid_request_error" if status < 500 else "api_error"
        )
        return {"type": "error", "error": {"type": kind, "message": message}}
    if protocol == "ollama":
        return {"error": message}
    return {"error": {"message": message, "type": error_type, "param": param}}


def error_response(
    status: int,
    message: str,
    error_type: str,
    param: str | None = None,
    headers=None,
    path: str = "/",
) -> JSONResponse:
    body = error_body(status, message, error_type, param, protocol_of(path))
    return JSONResponse(body, status_code=status, headers=headers)


def stream_error(exc: BaseException, protocol: Protocol = "openai") -> dict:
    """The body of an in-band error event, for a stream whose headers are already sent."""
    shutdown = isinstance(exc, ServerShuttingDownError)
    kind = "server_shutdown" if shutdown else "server_error"
    param = exc.field if isinstance(exc, MiniClaudeError) else None
    return error_body(503 if shutdown else 500, str(exc), kind, param, protocol)


def path_of(request: Request) -> str:
    return route_path(request.scope)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClientGone)
    async def _gone(_: Request, __: ClientGone) -> Response:
        # Nobody reads this: the client hung up (nginx's "client closed request" code).
        return Response(status_code=499)

    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, exc: HTTPProblem) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        headers.update(exc.headers or {})
        return error_response(
            exc.status, exc.message, exc.error_type, exc.param, headers, path_of(request)
        )

    @app.exception_handler(SessionNotFoundError)
    async def _no_session(request: Request, exc: SessionNotFoundError) -> JSONResponse:
        return error_response(404, str(exc), "not_found", exc.field, path=path_of(request))

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request: Request, exc: InvalidRequestError) -> JSONResponse:
        kind = "context_length_exceeded" if isinstance(exc, ContextOverflowError) else None
        return error_response(
            400, str(exc), kind or "invalid_request_error", exc.field, path=path_of(request)
        )

    @app.exception_handler(RemoteBackendError)
    async def _remote(request: Request, exc: RemoteBackendError) -> JSONResponse:
        # BACKEND=remote: the generation server failed or refused; we are its gateway.
        return error_response(502, str(exc), "remote_backend_error", path=path_of(request))

    @app.exception_handler(StorageError)
    async def _storage(request: Request, exc: StorageError) -> JSONResponse:
        # The reply was generated but could not be saved (a full disk): the session keeps its
        # earlier exchanges, and the client may try again once the operator made room.
        logger.error("%s", exc)
        return error_response(503, str(exc), "storage_error", path=path_of(request))

    @app.exception_handler(SessionBusyError)
    async def _session_busy(request: Request, exc: SessionBusyError) -> JSONResponse:
        return error_response(409, str(exc), "session_busy", exc.field, path=path_of(request))

    @app.exception_handler(ServerBusyError)
    async def _busy(request: Request, exc: ServerBusyError) -> JSONResponse:
        return error_response(
            503, str(exc), "server_busy", headers={"Retry-After": "1"}, path=path_of(request)
        )

    @app.exception_handler(ServerShuttingDownError)
    async def _shutdown(request: Request, exc: ServerShuttingDownError) -> JSONResponse:
        return error_response(503, str(exc), "server_shutdown", path=path_of(request))

    @app.exception_handler(MiniClaudeError)
    async def _core(request: Request, exc: MiniClaudeError) -> JSONResponse:
        return error_response(500, str(exc), type(exc).__name__, exc.field, path=path_of(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        first_field = None
        for error in exc.errors():
            location = [str(part) for part in error["loc"] if part != "body"]
            field = "body" if error["type"] == "json_invalid" else ".".join(location) or "body"
            first_field = first_field or field
            if error["type"] == "extra_forbidden":
                problems.append(f"{field}: unknown parameter")
            elif error["type"] == "json_invalid":
                problems.append(f"body: malformed JSON ({error.get('ctx', {}).get('error', '')})")
            else:
                problems.append(f"{field}: {error['msg']}")
        path = path_of(request)
        # FastAPI's 422; Anthropic's and Ollama's APIs answer a malformed request with 400.
        status = 422 if protocol_of(path) in ("openai", "mini-claude") else 400
        message = "; ".join(problems)
        return error_response(status, message, "invalid_request_error", first_field, path=path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: log it, and answer in the same JSON shape without a traceback.
        logger.error("Unhandled error", exc_info=exc)
        message = f"internal error ({type(exc).__name__})"
        return error_response(500, message, "server_error", path=path_of(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI could not read the body as JSON for a reason other than its syntax
            # (bytes that are not UTF-8, nesting too deep): malformed JSON all the same.
            cause = exc.__cause__
            message = f"body: malformed JSON ({type(cause).__name__}: {cause})"
            return error_response(
                422, message, "invalid_request_error", "body", path=path_of(request)
            )
        return error_response(exc.status_code, str(exc.detail), "http_error", path=path_of(request))


class RequestLimits:
    """Limits checked before a route sees a request, under any server: the number of headers
    (431), the body's size whether or not it declares a Content-Length (413; chunked bodies
    are counted as they arrive), and the time the whole body may take to arrive (408)."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        max_header_count: int,
        body_timeout_seconds: float,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_header_count = max_header_count
        self.body_timeout_seconds = body_timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if len(scope["headers"]) > self.max_header_count:
            message = (
                f"headers: the request has {len(scope['headers'])} headers, more than "
                f"{self.max_header_count} (MAX_HEADER_COUNT)"
            )
            await self._refuse(scope, receive, send, 431, message, "headers")
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse_size(scope, receive, send)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        # Read the body here, up to the limits, and replay it to the app.
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout_seconds):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # the client left
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.max_body_bytes:
                        await self._refuse_size(scope, receive, send)
                        return
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            message = (
                f"body: the request body did not arrive within {self.body_timeout_seconds:g} s "
                "(BODY_TIMEOUT_SECONDS)"
            )
            await self._refuse(scope, receive, send, 408, message, "body")
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse_size(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"body: request body is larger than {self.max_body_bytes} bytes (MAX_BODY_BYTES)"
        await self._refuse(scope, receive, send, 413, message, "body")

    @staticmethod
    async def _refuse(
        scope: Scope, receive: Receive, send: Send, status: int, message: str, param: str
    ) -> None:
        error_type = "request_timeout" if status == 408 else "request_too_large"
        headers = {"Connection": "close"}
        response = error_response(status, message, error_type, param, headers, route_path(scope))
        await response(scope, receive, send)


def sse_event(data: object, event: str | None = None) -> str:
    """One server-sent event: optional ``event:`` line, a JSON ``data:`` line, blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {payload}\n\n"


class QuietClientErrors:
    """ASGI wrapper for a mounted app (the Gradio UI): a client error (an HTTP 4xx) raised after
    the response has started, as Gradio's event stream raises for an unknown session once it
    has told the client so in-band, ends that response quietly instead of logging a traceback
    of a hundred lines per request (an easy way to flood the logs)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        finished = False

        async def watched(message: Message) -> None:
            nonlocal finished
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except RuntimeError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, StarletteHTTPException) and cause.status_code < 500):
                raise
            logger.info(
                "%s %s: %s after the response started",
                scope.get("method"),
                scope.get("path"),
                cause.status_code,
            )
            if not finished:  # end the stream properly: the client has had its answer
                await send({"type": "http.response.body", "body": b"", "more_body": False})
