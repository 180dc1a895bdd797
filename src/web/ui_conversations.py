"""The chat page's list of stored conversations: open, start, rename, delete, undo.

The page lists every session of the store to whoever may list them (``may_list_sessions``:
the holder of API_KEY, or on an open server a browser on the server's own machine), so API and
UI conversations appear side by side. Any other browser sees the conversations it started
itself, whose ids it keeps in its local storage.
"""

from __future__ import annotations

import time

import gradio as gr
from pydantic import SecretStr

from src.chat.store import SessionStore, SessionSummary
from src.errors import MiniClaudeError
from src.web.security import may_list_sessions
from src.web.ui_context import History
from src.web.ui_history import messages_to_history

LISTED = 100  # the most recent conversations shown


def label(summary: SessionSummary) -> str:
    when = time.strftime("%b %d %H:%M", time.localtime(summary.updated))
    return f"{summary.title} · {when}"


def visible_conversations(
    store: SessionStore, request: gr.Request | None, api_key: SecretStr | None, mine: list[str]
) -> list[SessionSummary]:
    host = request.client.host if request is not None and request.client else None
    if may_list_sessions(host, api_key):
        return store.summaries(LISTED)
    own = [summary for summary in map(store.summary, mine or []) if summary is not None]
    return sorted(own, key=lambda summary: summary.updated, reverse=True)[:LISTED]


def conversation_list(
    store: SessionStore,
    request: gr.Request | None,
    api_key: SecretStr | None,
    mine: list[str],
    current: str | None,
) -> gr.Radio:
    summaries = visible_conversations(store, request, api_key, mine)
    choices = [(label(summary), summary.id) for summary in summaries]
    shown = current if any(summary.id == current for summary in summaries) else None
    return gr.Radio(choices=choices, value=shown)


def remembered(mine: list[str] | None, session_id: str | None) -> list[str]:
    """This browser's conversations, with ``session_id`` added (the most recent first)."""
    mine = list(mine or [])
    if session_id and session_id not in mine:
        mine.insert(0, session_id)
    return mine[: LISTED * 10]


def opened(store: SessionStore, session_id: str) -> tuple[History, str | None, str]:
    """(chat history, system prompt, title) of a stored conversation."""
    conversation = store.get(session_id)
    if conversation is None:
        raise gr.Error("This conversation no longer exists (it was deleted).")
    summary = store.summary(session_id)
    return (
        messages_to_history(conversation.messages),
        conversation.system_prompt,
        summary.title if summary else "",
    )


def undo_last_exchange(store: SessionStore, session_id: str | None) -> History:
    """Remove the last exchange (and the feedback on it); a conversation left with nothing
    is deleted. Returns what is left."""
    conversation = store.get(session_id) if session_id else None
    if conversation is None or not conversation.messages:
        raise gr.Error("There is no exchange to undo.")
    keep = len(conversation.messages) - 2
    try:
        store.truncate(session_id, keep)  # refused while a reply to it is being written
    except MiniClaudeError as exc:
        raise gr.Error(str(exc)) from None
    if keep == 0:
        store.delete(session_id)
    return messages_to_history(conversation.messages[:keep])
