"""Generation parameters: one validated, immutable object shared by every front end and the
engine. A leaf module: it imports nothing of the project but its errors and validation helpers."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from src.errors import InvalidRequestError
from src.validation import describe_validation_error, first_field

MAX_NEW_TOKENS = 4096  # the longest reply any request may ask for (MAX_LENGTH is lower)
MAX_STOP_SEQUENCES = 8
MIN_TEMPERATURE = 0.01
MAX_STOP_SEQUENCE_CHARS = 64


class GenerationParams(BaseModel):
    """How to decode one reply. Unknown names are rejected, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(
        128, ge=1, le=MAX_NEW_TOKENS, description="Most tokens to generate."
    )
    temperature: float = Field(
        0.7, ge=0.0, le=5.0, description="0 means greedy; otherwise at least 0.01."
    )
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 disables.")
    top_k: int = Field(50, ge=0, le=10_000, description="Keep the k likeliest tokens; 0 disables.")
    repetition_penalty: float = Field(
        1.1, ge=0.05, le=10.0, description="CTRL-style penalty on seen tokens; 1 disables."
    )
    do_sample: bool = Field(True, description="Sample; false means greedy decoding.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Seed for sampling.")
    stop: tuple[str, ...] = Field(
        (), max_length=MAX_STOP_SEQUENCES, description="Strings that end the reply."
    )

    @field_validator("temperature")
    @classmethod
    def _temperature_zero_or_usable(cls, value: float) -> float:
        # Dividing logits by a near-zero temperature overflows to inf and sampling fails.
        if 0.0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return value

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
