"""What every handler of the chat page needs: the service for an adapter, the session store,
and the generation parameters the page's controls describe. Errors become ``gr.Error`` (a
readable message in the page, never a traceback)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from src.chat.adapter_pool import AdapterPool
from src.chat.service import ChatService
from src.chat.store import SessionStore
from src.errors import MiniClaudeError
from src.params import GenerationParams, make_params
from src.web.ui_tokens import TOP_ALTERNATIVES

PoolGetter = Callable[[], AdapterPool | None]
History = list[dict[str, Any]]
BASE_MODEL_CHOICE = "(base model)"


def service_or_error(get_pool: PoolGetter, adapter: str | None = None) -> ChatService:
    pool = get_pool()
    if pool is None:
        raise gr.Error("The model is still loading. Try again in a few seconds.")
    try:
        return pool.get(None if adapter in (None, "", BASE_MODEL_CHOICE) else adapter)
    except MiniClaudeError as exc:
        raise gr.Error(str(exc)) from None


def store_or_error(get_pool: PoolGetter) -> SessionStore:
    store = service_or_error(get_pool).store
    if store is None:  # every entry point builds its stack with sessions
        raise gr.Error("This server keeps no conversations (it was started without a store).")
    return store


@dataclass(frozen=True)
class Controls:
    """The values of the page's generation controls, in the order the page passes them."""

    system_prompt: str
    temperature: float
    top_p: float
    max_new_tokens: float
    repetition_penalty: float
    json_mode: bool = False
    show_tokens: bool = False

    def params(self, service: ChatService) -> GenerationParams:
        try:
            return make_params(
                {
                    **service.default_params.model_dump(),
                    "temperature": self.temperature,
                    "do_sample": self.temperature > 0,
                    "top_p": self.top_p,
                    "max_new_tokens": int(self.max_new_tokens),
                    "repetition_penalty": self.repetition_penalty,
                    "response_format": {"type": "json_object"} if self.json_mode else None,
                    "logprobs": bool(self.show_tokens),
                    "top_logprobs": TOP_ALTERNATIVES if self.show_tokens else 0,
                }
            )
        except MiniClaudeError as exc:
            raise gr.Error(str(exc)) from None
