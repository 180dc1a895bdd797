"""Bodies of the session routes: the list of conversations, renaming, feedback, candidates."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from src.chat.feedback_records import FeedbackRecord
from src.chat.store import SessionSummary
from src.web.schemas import GenerationOverrides, Usage

MAX_TITLE_CHARS = 200
MAX_COMMENT_CHARS = 2_000


class SessionSummaryResponse(BaseModel):
    session_id: str
    title: str = Field(description="Its name, or the start of its first message.")
    messages: int = Field(description="How many messages it holds.")
    created: float = Field(description="Unix time of its first exchange.")
    updated: float = Field(description="Unix time of its last change.")

    @classmethod
    def of(cls, summary: SessionSummary) -> SessionSummaryResponse:
        return cls(
            session_id=summary.id,
            title=summary.title,
            messages=summary.messages,
            created=summary.created,
            updated=summary.updated,
        )


class SessionListResponse(BaseModel):
    sessions: list[SessionSummaryResponse] = Field(description="Most recently updated first.")


class RenameRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    title: str = Field(min_length=1, max_length=MAX_TITLE_CHARS)


class FeedbackRequest(BaseModel):
    """A judgement of one reply: exactly one of ``rating``, ``edit``, ``chosen_candidate`` or
    ``rejected_candidate``, with an optional comment."""

    model_config = ConfigDict(extra="forbid", strict=True)

    message_index: int = Field(
        ge=0, description="The reply's place in the session's messages (an assistant message)."
    )
    rating: Literal["good", "bad", "none"] | None = Field(
        None, description="good or bad; none withdraws an earlier rating."
    )
    edit: str | None = Field(
        None,
        description="A better reply, written by hand: kept as preferred over the model's, and "
        "shown in the session from now on.",
    )
    chosen_candidate: int | None = Field(
        None,
        description="The id of a candidate (POST /sessions/{id}/candidates) preferred over the "
        "reply shown, which it replaces.",
    )
    rejected_candidate: int | None = Field(
        None, description="The id of a candidate the reply shown is preferred to (it stays)."
    )
    comment: str | None = Field(None, max_length=MAX_COMMENT_CHARS)


class FeedbackResponse(BaseModel):
    feedback_id: int
    kind: Literal["rating", "edit", "choice"]
    message_index: int | None
    rating: Literal["good", "bad", "none"] | None
    comment: str | None
    reply: str = Field(
        description="The reply judged (in an edit or a choice: the one not preferred)."
    )
    preferred: str | None = Field(description="The reply preferred to it, if any.")
    model: str | None = Field(description="The model that wrote the judged reply.")
    adapter: str | None
    source: Literal["api", "ui", "cli"]
    created: float

    @classmethod
    def of(cls, record: FeedbackRecord) -> FeedbackResponse:
        return cls(
            feedback_id=record.id,
            kind=record.kind,
            message_index=record.reply.message_index,
            rating=record.rating,
            comment=record.comment,
            reply=record.reply.content,
            preferred=record.preferred.content if record.preferred else None,
            model=record.reply.generation.model,
            adapter=record.reply.generation.adapter,
            source=record.source,
            created=record.created,
        )


class FeedbackListResponse(BaseModel):
    feedback: list[FeedbackResponse] = Field(description="Oldest first.")


class CandidateRequest(GenerationOverrides):
    model_config = ConfigDict(extra="forbid", strict=True)

    message_index: int | None = Field(
        None, ge=0, description="The reply to find an alternative to; omit for the last one."
    )
    adapter: str | None = Field(None, description="A LoRA adapter from ADAPTERS_DIR, by name.")


class CandidateResponse(BaseModel):
    candidate_id: int = Field(description="Name it as chosen_candidate in feedback to keep it.")
    message_index: int
    content: str
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: Usage
