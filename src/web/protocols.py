"""The wire protocols the API speaks, told apart by the request's path. Each protocol answers
errors in its own shape (``src/web/errors.py``), so that its official client reads them."""

from __future__ import annotations

from typing import Literal

from starlette.types import Scope

Protocol = Literal["openai", "anthropic", "ollama", "mini-claude"]


def route_path(scope: Scope) -> str:
    """The path the app routes on (without a deployment's root_path)."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def protocol_of(path: str) -> Protocol:
    """Anthropic's Messages API under /v1/messages, Ollama's under /api, OpenAI's under the
    rest of /v1; everything else (/chat, /sessions, /health, ...) is the project's own."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    if path.startswith("/api/"):
        return "ollama"
    if path.startswith("/v1/"):
        return "openai"
    return "mini-claude"
