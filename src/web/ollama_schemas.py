"""Ollama's API on the wire: the requests of ``/api/chat``, ``/api/generate`` and
``/api/show``, and the ``options`` they share (Ollama's parameter names).

Strict like the other protocols' schemas: a field or an option that is not in Ollama's API is
an error naming it. Those that cannot apply here are accepted and ignored (``IGNORED_OPTIONS``
and the README).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Options Ollama's runner uses to place and run a model (threads, GPUs, memory mapping) or
# samplers this project does not have: accepted, so that clients sending them work, and
# ignored. The server's own settings decide those things here.
IGNORED_OPTIONS = (
    "numa",
    "num_ctx",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "low_vram",
    "f16_kv",
    "logits_all",
    "vocab_only",
    "use_mmap",
    "use_mlock",
    "embedding_only",
    "num_thread",
    "num_keep",
    "tfs_z",
    "typical_p",
    "repeat_last_n",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "penalize_newline",
)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_predict: int | None = None  # the reply's most tokens; -1 (or -2): as many as fit
    temperature: float | None = Field(None, ge=0.0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] | None = None
    repeat_penalty: float | None = Field(None, gt=0.0)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # accepted and ignored (IGNORED_OPTIONS)
    numa: bool | None = None
    num_ctx: int | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    embedding_only: bool | None = None
    num_thread: int | None = None
    num_keep: int | None = None
    tfs_z: float | None = None
    typical_p: float | None = None
    repeat_last_n: int | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    penalize_newline: bool | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")  # index, ...

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")  # type, ...

    id: str | None = None
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None  # refused by name: this model reads text
    thinking: str | None = None  # an earlier reply's thinking: not shown to the model
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None  # on a tool message: which tool answered
    tool_call_id: str | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = "function"
    function: FunctionDefinition


class GenerationRequest(BaseModel):
    """What /api/chat and /api/generate share."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    stream: bool = True  # Ollama streams unless told not to
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: Options | None = None
    keep_alive: float | str | None = None  # accepted: the model stays loaded here anyway
    think: bool | str | None = None  # accepted: this model does not think aloud apart
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    truncate: bool | None = None  # accepted: the oldest turns are dropped to fit anyway
    shift: bool | None = None


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(default_factory=list)
    tools: list[ToolDefinition] | None = None


class GenerateRequest(GenerationRequest):
    prompt: str = ""
    system: str | None = None
    raw: bool | None = None  # the prompt as it is, without the chat template
    suffix: str | None = None  # fill-in-the-middle: refused unless empty
    template: str | None = None  # a Go template of Ollama's: refused unless empty
    context: list[int] | None = None  # deprecated by Ollama: refused unless empty
    images: list[str] | None = None


class ErrorResponse(BaseModel):
    """Ollama's error shape (``src/web/errors.py`` writes it)."""

    error: str


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 502, 503)}
# Streamed unless "stream": false: one JSON object per line.
STREAMED_LINES = {200: {"content": {"application/json": {}, "application/x-ndjson": {}}}}


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    name: str | None = None  # the older name of ``model``
    verbose: bool | None = None
