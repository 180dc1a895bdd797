"""Judging replies in the chat page: thumbs up or down, an edited reply, or the better of two
candidates, each saved with the reply's context for preference tuning (source "ui")."""

from __future__ import annotations

from typing import Any

import gradio as gr

from src.chat.feedback_records import FeedbackRecord, Rating
from src.errors import MiniClaudeError
from src.web.ui_context import History, PoolGetter, service_or_error
from src.web.ui_history import messages_to_history, text_of

SAVED = {
    "good": "Saved: a good reply.",
    "bad": "Saved: a bad reply.",
    "none": "Rating withdrawn.",
}


def judged(get_pool: PoolGetter, session_id: str | None, index: int, **judgement) -> FeedbackRecord:
    if not session_id:
        raise gr.Error("Send a message first: there is no reply to judge.")
    service = service_or_error(get_pool)
    try:
        return service.feedback.judge(session_id, index, "ui", **judgement)
    except MiniClaudeError as exc:
        raise gr.Error(str(exc)) from None


def rating_of(liked: Any) -> Rating:
    """Gradio's like value: True (thumbs up), False (thumbs down), anything else (the same
    thumb clicked again, which clears it) withdraws the rating."""
    if liked is True or liked == "Like":
        return "good"
    if liked is False or liked == "Dislike":
        return "bad"
    return "none"


def rate(
    get_pool: PoolGetter, session_id: str | None, comment: str, data: gr.LikeData
) -> tuple[str, str]:
    """(status line, comment box): the comment goes with the rating, then the box empties."""
    rating = rating_of(data.liked)
    judged(get_pool, session_id, int(data.index), rating=rating, comment=comment.strip() or None)
    return SAVED[rating] + (" With your comment." if comment.strip() else ""), ""


def edit(
    get_pool: PoolGetter, session_id: str | None, comment: str, data: gr.EditData
) -> tuple[History, str, str]:
    """(chat history, status line, comment box) after an edit: a reply edited is saved as
    preferred to the model's; the user's own messages cannot be edited (the replies after
    them would no longer answer them), so such an edit is undone."""
    service = service_or_error(get_pool)
    session = service.get_session(session_id) if session_id else None
    if session is None:
        raise gr.Error("Send a message first: there is no reply to edit.")
    index = int(data.index)
    if index % 2 == 0:
        status = "Only replies can be edited: to change your message, undo and send it again."
        return messages_to_history(session.messages), status, comment
    judged(get_pool, session_id, index, edit=text_of(data.value), comment=comment.strip() or None)
    fixed = service.get_session(session_id)
    status = "Saved: your edit is the preferred reply (and the conversation continues from it)."
    return messages_to_history(fixed.messages), status, ""


def choose(
    get_pool: PoolGetter,
    session_id: str | None,
    candidate_id: int | None,
    comment: str,
    keep_candidate: bool,
) -> tuple[History, Any, None, str, str]:
    """(chat history, candidate panel, candidate id, status line, comment box) once the user
    picked the better of the reply shown and the candidate."""
    if candidate_id is None:
        raise gr.Error("The other reply is still being written (or was stopped).")
    service = service_or_error(get_pool)
    session = service.get_session(session_id) if session_id else None
    if session is None:
        raise gr.Error("This conversation no longer exists (it was deleted).")
    index = len(session.messages) - 1
    choice = "chosen_candidate" if keep_candidate else "rejected_candidate"
    judged(get_pool, session_id, index, **{choice: candidate_id}, comment=comment.strip() or None)
    history = messages_to_history(service.get_session(session_id).messages)
    status = (
        "Saved: the new reply is preferred, and replaces the first."
        if keep_candidate
        else ("Saved: the first reply is preferred to the new one.")
    )
    return history, gr.Group(visible=False), None, status, ""
