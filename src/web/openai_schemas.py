"""The OpenAI wire format: Chat Completions and (legacy) Completions requests and responses.

Every field of the current Chat Completions request is accepted. Those that cannot apply to
a local text model are listed in ``IGNORED_CHAT_FIELDS`` (and the README); a field that is not
in the API at all is a 422 naming it, so a typo never passes silently.

Request models are strict: a value has the JSON type the API gives it (``true`` is not the
number 1, ``"5"`` is not 5, ``2.0`` is not the integer 2), as OpenAI's own API checks.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from src.errors import InvalidRequestError

# OpenAPI: with "stream": true, a 200 is server-sent events instead of the JSON object. Before
# OpenAPI 3.2 (FastAPI writes 3.1) an event stream's schema describes one event: its fields.
SSE_EVENT = {
    "type": "object",
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
    },
    "required": ["data"],
}
STREAMED = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}}

# Accepted for compatibility, and ignored: nothing a local text model can do with them.
IGNORED_CHAT_FIELDS = (
    "audio",
    "metadata",
    "modalities",
    "moderation",
    "prediction",
    "prompt_cache_key",
    "prompt_cache_options",
    "prompt_cache_retention",
    "reasoning_effort",
    "safety_identifier",
    "service_tier",
    "store",
    "user",
    "verbosity",
    "web_search_options",
)


class ContentPart(BaseModel):
    """One part of a message's content; only ``text`` parts can be read by this model."""

    model_config = ConfigDict(strict=True, extra="allow")

    type: str
    text: str | None = None


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    name: str
    arguments: str = "{}"


class ToolCallIn(BaseModel):
    """A call an assistant message made earlier in the conversation."""

    model_config = ConfigDict(strict=True, extra="ignore")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # clients add fields of their own

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCallIn | None = None  # legacy, on assistant messages


class StreamOptions(BaseModel):
    model_config = ConfigDict(
        strict=True, extra="ignore"
    )  # include_obfuscation: nothing to obfuscate

    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)

    name: str = "reply"
    description: str | None = None
    # "schema" is a BaseModel attribute name; the wire name is kept by the alias
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # always enforced here: the grammar guarantees it


class ResponseFormatIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def to_core(self) -> dict[str, Any]:
        """As the core's ``ResponseFormat`` values."""
        if self.type != "json_schema":
            return {"type": self.type}
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise InvalidRequestError(
                "response_format: type 'json_schema' needs json_schema.schema", "response_format"
            )
        schema = self.json_schema
        return {"type": "json_schema", "json_schema": schema.schema_, "name": schema.name}


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # always enforced here


class ToolIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None  # accepted for compatibility; the server has one model
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormatIn | None = None
    tools: list[ToolIn] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = None  # legacy form of tools
    function_call: Literal["none", "auto"] | NamedFunction | None = None  # legacy tool_choice
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's sampling extras (BACKEND=remote sends them): top_k -1 or 0 turns it off.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    # accepted and ignored (IGNORED_CHAT_FIELDS)
    audio: Any = None
    metadata: dict[str, str] | None = None
    modalities: list[str] | None = None
    moderation: Any = None
    prediction: Any = None
    prompt_cache_key: str | None = None
    prompt_cache_options: Any = None
    prompt_cache_retention: str | None = None
    reasoning_effort: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    user: str | None = None
    verbosity: str | None = None
    web_search_options: Any = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | None = None
    function_call: FunctionCallOut | None = None  # legacy ``functions`` requests


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


FinishReason = Literal["stop", "length", "tool_calls", "function_call"]


class Choice(BaseModel):
    index: int = 0
    message: ChoiceMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "mini-claude"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- legacy completions ------------------------------------------------------------------


class CompletionRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for this endpoint
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, le=5)  # OpenAI allows up to 5 here
    echo: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    best_of: int | None = Field(None, ge=1, le=1)  # only 1: the reply is the one choice
    suffix: str | None = None  # insertion is not supported: must be null
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage
