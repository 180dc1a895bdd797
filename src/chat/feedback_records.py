"""What feedback is made of: a reply with the context it answered and how it was generated,
and a judgement of it (see ``src/chat/feedback.py`` for how they are stored)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Rating = Literal["good", "bad", "none"]
Origin = Literal["model", "candidate", "edit"]
Source = Literal["api", "ui", "cli"]


@dataclass(frozen=True)
class Generation:
    """How a reply was made: by which model and adapter, with which parameters."""

    model: str | None
    adapter: str | None = None
    params: dict[str, Any] | None = None


@dataclass(frozen=True)
class ReplyRecord:
    id: int
    session_id: str | None
    message_index: int | None
    content: str
    origin: Origin
    system_prompt: str | None
    messages: list[dict]  # the conversation before the reply (ends with the user's turn)
    generation: Generation


@dataclass(frozen=True)
class FeedbackRecord:
    id: int
    reply: ReplyRecord  # the reply judged; in a preference, the one not chosen
    rating: Rating | None
    preferred: ReplyRecord | None
    comment: str | None
    source: Source
    created: float

    @property
    def kind(self) -> Literal["rating", "edit", "choice"]:
        if self.preferred is None:
            return "rating"
        if "candidate" in (self.reply.origin, self.preferred.origin):
            return "choice"
        return "edit"
