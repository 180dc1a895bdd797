"""Request and response bodies of the native API (one schema per use)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from src.chat.service import ChatResult
from src.params import MAX_TOP_LOGPROBS, GenerationParams, make_params
from src.web.openai_schemas import ResponseFormatIn, TokenLogprob
from src.web.openai_translate import token_logprob


class GenerationOverrides(BaseModel):
    """Per-request generation parameters; anything left out uses the server's defaults.
    Ranges are checked by ``GenerationParams`` and reported with the field's name."""

    model_config = ConfigDict(strict=True)  # JSON types as they are: true is not 1

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    do_sample: bool | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = Field(None, description="Each reply token's log-probability.")
    top_logprobs: int | None = Field(None, description="With logprobs: alternatives (0-20).")
    response_format: ResponseFormatIn | None = Field(
        None, description="As in OpenAI's API: json_object, or json_schema with a schema."
    )

    def apply_to(self, defaults: GenerationParams) -> GenerationParams:
        overrides = self.model_dump(
            exclude_none=True, include=set(GenerationOverrides.model_fields)
        )
        if self.response_format is not None:
            overrides["response_format"] = self.response_format.to_core()
        return make_params({**defaults.model_dump(), **overrides})


class ChatRequest(GenerationOverrides):
    model_config = ConfigDict(extra="forbid", strict=True)

    message: str = Field(description="The user's message.")
    session_id: str | None = Field(None, description="Continue this session; omit to start one.")
    system_prompt: str | None = Field(None, description="System prompt for a new session.")
    adapter: str | None = Field(None, description="A LoRA adapter from ADAPTERS_DIR, by name.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, result: ChatResult) -> Usage:
        total = result.prompt_tokens + result.completion_tokens
        return cls(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=total,
        )


class Timing(BaseModel):
    seconds: float
    first_token_seconds: float | None
    tokens_per_second: float


class ChatResponse(BaseModel):
    response: str
    session_id: str
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: Usage
    timing: Timing
    dropped_messages: int = Field(description="Oldest messages left out to fit the context.")
    cached: bool
    logprobs: list[TokenLogprob] | None = Field(
        None, description="With logprobs: each reply token, as in OpenAI's API."
    )

    @classmethod
    def from_result(cls, result: ChatResult, session_id: str) -> ChatResponse:
        return cls(
            response=result.text,
            session_id=session_id,
            finish_reason=result.finish_reason,
            usage=Usage.of(result),
            timing=Timing(
                seconds=round(result.seconds, 4),
                first_token_seconds=result.first_token_seconds,
                tokens_per_second=round(result.tokens_per_second, 2),
            ),
            dropped_messages=result.dropped_messages,
            cached=result.cached,
            logprobs=None
            if result.logprobs is None
            else [token_logprob(token, MAX_TOP_LOGPROBS) for token in result.logprobs],
        )


class Message(BaseModel):
    role: Literal["user", "assistant"]
    content: str


class SessionResponse(BaseModel):
    session_id: str
    system_prompt: str | None
    messages: list[Message]


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "error"]
    model: str | None = None
    backend: Literal["local", "remote"] | None = Field(
        None, description="Where replies are generated: here, or on REMOTE_BASE_URL."
    )
    context_window: int | None = Field(
        None, description="Most tokens of prompt and reply one conversation may hold (local)."
    )
    kv_cache_mb: float | None = Field(
        None, description="Memory the keys and values of a conversation filling it take."
    )
    decoding: dict[str, int] | None = Field(
        None,
        description="The base model's engine since start-up (local): decoding steps, the rows "
        "they carried (rows / steps is the average batch), prefill passes and their rows.",
    )
    detail: str | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None


class ErrorResponse(BaseModel):
    """The shape of every error, as in the OpenAI API, so any client can read it."""

    error: ErrorBody
