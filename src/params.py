"""Generation parameters: one validated, immutable object shared by every front end and the
engine. A leaf module: it imports nothing of the project but its errors and validation helpers."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from src.errors import InvalidRequestError
from src.validation import describe_validation_error, first_field

MAX_NEW_TOKENS = 4096  # the longest reply any request may ask for (MAX_LENGTH is lower)
MAX_STOP_SEQUENCES = 8
MIN_TEMPERATURE = 0.01
MAX_STOP_SEQUENCE_CHARS = 64
MAX_TOP_LOGPROBS = 20  # alternatives per token, as in OpenAI's API
MAX_LOGIT_BIAS_ENTRIES = 300  # as in OpenAI's API
MAX_SCHEMA_CHARS = 32_000  # a response format's JSON schema, as JSON text: its grammar's size


class ResponseFormat(BaseModel):
    """What shape the reply must have: free text, any JSON object, or JSON valid against a
    schema. A grammar built from it masks every token that would break the shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = Field(
        None, description="The JSON schema the reply must validate against (json_schema only)."
    )
    name: str | None = Field(None, description="The schema's name (informational).")

    @model_validator(mode="after")
    def _schema_when_asked(self) -> ResponseFormat:
        if self.type == "json_schema" and not isinstance(self.json_schema, dict):
            raise ValueError("type 'json_schema' needs a JSON schema object")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"a schema is only used with type 'json_schema', not {self.type!r}")
        size = len(json.dumps(self.json_schema)) if self.json_schema is not None else 0
        if size > MAX_SCHEMA_CHARS:
            raise ValueError(
                f"the schema is {size} characters as JSON, over the limit of {MAX_SCHEMA_CHARS}"
            )
        return self

    @property
    def constrains(self) -> bool:
        return self.type != "text"


class GenerationParams(BaseModel):
    """How to decode one reply. Unknown names are rejected, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(
        128,
        ge=0,
        le=MAX_NEW_TOKENS,
        description="Most tokens to generate (0: only score the prompt).",
    )
    temperature: float = Field(
        0.7, ge=0.0, le=5.0, description="0 means greedy (and so does anything below 0.01)."
    )
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 disables.")
    top_k: int = Field(50, ge=0, le=10_000, description="Keep the k likeliest tokens; 0 disables.")
    min_p: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Drop tokens less likely than min_p times the likeliest one; 0 disables.",
    )
    repetition_penalty: float = Field(
        1.1, ge=0.05, le=10.0, description="CTRL-style penalty on seen tokens; 1 disables."
    )
    presence_penalty: float = Field(
        0.0,
        ge=-2.0,
        le=2.0,
        description="Subtracted from every token already in the reply (OpenAI's definition).",
    )
    frequency_penalty: float = Field(
        0.0,
        ge=-2.0,
        le=2.0,
        description="Subtracted once per earlier occurrence in the reply (OpenAI's definition).",
    )
    logit_bias: dict[int, float] = Field(
        default_factory=dict,
        max_length=MAX_LOGIT_BIAS_ENTRIES,
        description="Token id -> bias added to its logit (-100 to 100; -100 bans the token).",
    )
    do_sample: bool = Field(True, description="Sample; false means greedy decoding.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Seed for sampling.")
    stop: tuple[str, ...] = Field(
        (), max_length=MAX_STOP_SEQUENCES, description="Strings that end the reply."
    )
    logprobs: bool = Field(False, description="Report each generated token's log-probability.")
    top_logprobs: int = Field(
        0,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="With logprobs: also the likeliest alternatives at each position.",
    )
    prompt_logprobs: bool = Field(
        False, description="Also report the prompt's own tokens' log-probabilities (echo)."
    )
    response_format: ResponseFormat | None = Field(
        None, description="Constrain the reply to JSON (any object, or valid against a schema)."
    )

    @field_validator("logit_bias")
    @classmethod
    def _bias_in_range(cls, value: dict[int, float]) -> dict[int, float]:
        for token_id, bias in value.items():
            if token_id < 0:
                raise ValueError(f"token id {token_id} is negative")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"bias {bias} for token {token_id} is outside -100 to 100")
        return value

    @field_validator("temperature")
    @classmethod
    def _near_zero_temperature_is_greedy(cls, value: float) -> float:
        # Dividing logits by a near-zero temperature overflows to inf and sampling fails; the
        # distribution it asks for is the greedy choice anyway. OpenAI's, Anthropic's and
        # Ollama's APIs accept any temperature from 0, so such a request is served greedily
        # (as vLLM does below its own threshold), not refused.
        return 0.0 if value < MIN_TEMPERATURE else value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, value: Any) -> Any:
        # A single string is a common (OpenAI-style) shorthand for a one-element list.
        return (value,) if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            if not item:
                raise ValueError("stop sequences must not be empty strings")
            if len(item) > MAX_STOP_SEQUENCE_CHARS:
                raise ValueError(f"stop sequences are at most {MAX_STOP_SEQUENCE_CHARS} characters")
        return value

    @property
    def is_greedy(self) -> bool:
        """Greedy decoding is deterministic: the same prompt always gives the same reply."""
        return not self.do_sample or self.temperature == 0.0

    def updated(self, **changes: Any) -> GenerationParams:
        """A copy with some values changed, validated (``model_copy`` would skip validation)."""
        return make_params({**self.model_dump(), **changes})


def check_reply_length(value: int | None, field: str, limit: int) -> None:
    """Refuse a reply length (``max_new_tokens``, or OpenAI's ``max_tokens``) over MAX_LENGTH,
    the most tokens one reply may have, naming the field as the client spelled it."""
    if value is not None and value > limit:
        raise InvalidRequestError(
            f"{field}: {value} is over the limit of {limit} (MAX_LENGTH, the most tokens one "
            "reply may have)",
            field,
        )


def make_params(values: dict[str, Any]) -> GenerationParams:
    """Validate raw values (strings from the CLI or JSON numbers) into ``GenerationParams``."""
    try:
        return GenerationParams.model_validate(values)
    except ValidationError as exc:
        raise InvalidRequestError(describe_validation_error(exc), first_field(exc)) from None
