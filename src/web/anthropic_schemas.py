"""Anthropic's Messages API on the wire: the request of ``POST /v1/messages`` and
``POST /v1/messages/count_tokens``, and the message it answers with.

Request models are strict, as in the OpenAI schemas: a field that is not in the API is an
error naming it. Content blocks are read loosely here (any ``type``) and checked by type in
``src/web/anthropic_translate.py``, so that an image or a document block gets a message that
says this model reads text, not a schema dump.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ContentBlock(BaseModel):
    """One block of a message's content: ``text``, ``tool_use`` or ``tool_result`` (others
    are refused by name when the request is translated)."""

    model_config = ConfigDict(strict=True, extra="allow")  # cache_control, citations, ...

    type: str
    text: str | None = None
    # tool_use (an assistant's earlier call)
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    # tool_result (the client's answer to a call)
    tool_use_id: str | None = None
    content: str | list[ContentBlock] | None = None
    is_error: bool | None = None


class MessageIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class ToolDefinition(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # type, cache_control: accepted

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None  # with type "tool"
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(BaseModel):
    """Extended thinking (``enabled``, ``adaptive``, ``disabled``): accepted, and nothing
    changes (this model does not think aloud in separate blocks)."""

    model_config = ConfigDict(strict=True, extra="allow")  # budget_tokens, ...

    type: str


class OutputFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)

    type: Literal["json_schema"]
    # "schema" is a BaseModel attribute name; the wire name is kept by the alias
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    format: OutputFormat | None = None  # structured outputs: enforced by the grammar
    effort: str | None = None  # accepted and ignored: one way of answering here


# Accepted for compatibility with Anthropic's clients, and ignored: nothing a local model on
# one machine can do with them (caching is automatic here: the prefix cache).
IGNORED_MESSAGE_FIELDS = (
    "cache_control",
    "container",
    "diagnostics",
    "inference_geo",
    "metadata",
    "service_tier",
    "speed",
    "user_profile_id",
    "workspace_id",
)


class CountTokensRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str
    messages: list[MessageIn] = Field(min_length=1)
    system: str | list[ContentBlock] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None  # the earlier name of output_config.format
    # accepted and ignored (IGNORED_MESSAGE_FIELDS)
    cache_control: dict[str, Any] | None = None
    container: Any = None
    diagnostics: dict[str, Any] | None = None
    inference_geo: str | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    speed: str | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None

    @property
    def output_schema(self) -> dict[str, Any] | None:
        """The JSON schema replies must follow, if the request sets one."""
        given = self.output_config.format if self.output_config else None
        given = given or self.output_format
        return given.schema_ if given is not None else None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)  # required, as Anthropic requires it
    stop_sequences: list[str] | None = None
    stream: bool = False
    # Sampling: today's SDK no longer sends these, but the API and older clients do.
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)


class TextBlockOut(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseBlockOut(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextBlockOut | ToolUseBlockOut]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: Usage


class TokenCount(BaseModel):
    input_tokens: int


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    """Anthropic's error shape (``src/web/errors.py`` writes it)."""

    type: Literal["error"] = "error"
    error: ErrorDetail


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 502, 503)}
