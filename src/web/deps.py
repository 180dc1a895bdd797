"""Dependencies: the loaded ChatService, the settings, and the optional API key."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from src.chat.adapter_pool import AdapterPool
from src.chat.service import ChatService
from src.config import Settings
from src.web.errors import HTTPProblem
from src.web.security import API_KEY_HELP, ClientSlots, key_accepted


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_service(request: Request) -> ChatService:
    """The model loads in the background at start-up; until then requests get 503."""
    service = request.app.state.service
    if service is None:
        error = request.app.state.load_error
        message = f"model failed to load: {error}" if error else "the model is still loading"
        raise HTTPProblem(503, message, "service_unavailable")
    return service


def get_adapter_pool(request: Request, service: Annotated[ChatService, Depends(get_service)]):
    """The base service and the adapters in ADAPTERS_DIR (available once the model loaded)."""
    return request.app.state.adapters


def require_api_key(request: Request) -> None:
    """With API_KEY set, require the key (compared in constant time). The APIKeyGuard
    middleware already checks every path; this keeps the routers safe on their own."""
    if not key_accepted(request.headers, get_settings(request).api_key):
        raise HTTPProblem(401, API_KEY_HELP, "authentication_error")


def get_slots(request: Request) -> ClientSlots:
    return request.app.state.slots


ServiceDep = Annotated[ChatService, Depends(get_service)]
AdapterPoolDep = Annotated[AdapterPool, Depends(get_adapter_pool)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
SlotsDep = Annotated[ClientSlots, Depends(get_slots)]
