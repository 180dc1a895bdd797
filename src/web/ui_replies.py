"""Replies in the chat page: a reply to the user's message, saved to the conversation's
session, and another candidate for the last reply, to compare with it. Both stream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from src.chat.conversation import Conversation
from src.chat.service import ChatService, ReplyStream
from src.errors import MiniClaudeError
from src.web.ui_context import Controls, History, PoolGetter, service_or_error
from src.web.ui_history import messages_to_history
from src.web.ui_tokens import tokens_html

# A candidate under greedy settings would repeat the reply word for word: it samples instead.
CANDIDATE_TEMPERATURE = 0.8


def open_conversation(
    service: ChatService, session_id: str | None, history: History, system_prompt: str
) -> Conversation:
    """The stored session the page shows, or a new one (saved with its first exchange)."""
    if session_id:
        conversation = service.get_session(session_id)
        if conversation is not None:
            return conversation
        if history:  # it was saved, and is gone now
            raise gr.Error("This conversation no longer exists (it was deleted); start a new one.")
    return service.new_session(system_prompt or None)


def finish_on_stop(stream: ReplyStream, deltas: Iterator[Any]) -> None:
    """The page stopped listening (Stop, or the tab closed): end the reply after the current
    token and keep what was written, as the CLI's Ctrl-C does."""
    if stream.result is None:
        stream.cancel()
        try:
            for _ in deltas:
                pass
        except MiniClaudeError:
            stream.abandon()


def status_line(service: ChatService, stream: ReplyStream) -> str:
    result = stream.result
    status = f"**{service.model_name}** · {result.completion_tokens} tokens · "
    status += f"{result.tokens_per_second:.1f} tokens/s"
    if result.dropped_messages:
        status += f" · {result.dropped_messages} oldest messages left out of the context"
    return status


def stream_reply(
    get_pool: PoolGetter,
    adapter: str | None,
    session_id: str | None,
    message: str,
    history: History,
    controls: Controls,
) -> Iterator[tuple[History, str, str, str, str]]:
    """Yield (chat history, textbox value, status line, token view, session id) as the reply
    grows; the exchange is saved to the session when it ends."""
    service = service_or_error(get_pool, adapter)
    conversation = open_conversation(service, session_id, history, controls.system_prompt)
    try:
        stream = service.start_reply(conversation, message, controls.params(service))
    except MiniClaudeError as exc:
        raise gr.Error(str(exc)) from None
    shown = messages_to_history(conversation.messages) + [
        {"role": "user", "content": message},
        {"role": "assistant", "content": ""},
    ]
    deltas = iter(stream)
    try:
        yield shown, "", "_writing…_", "", conversation.id
        for delta in deltas:
            shown[-1]["content"] += delta
            yield shown, "", "_writing…_", "", conversation.id
    except MiniClaudeError as exc:  # e.g. a remote backend that failed mid-reply
        raise gr.Error(str(exc)) from None
    finally:
        finish_on_stop(stream, deltas)
    tokens = tokens_html(stream.result.logprobs or [])
    yield shown, "", status_line(service, stream), tokens, conversation.id


def stream_candidate(
    get_pool: PoolGetter, adapter: str | None, session_id: str | None, controls: Controls
) -> Iterator[tuple[str, int | None, str]]:
    """Yield (candidate text, its id once recorded, status line) for another reply to the
    last message of the session."""
    service = service_or_error(get_pool, adapter)
    session = service.get_session(session_id) if session_id else None
    if session is None or not session.messages:
        raise gr.Error("There is no reply to compare yet: send a message first.")
    params = controls.params(service)
    note = ""
    if params.is_greedy:
        params = params.updated(do_sample=True, temperature=CANDIDATE_TEMPERATURE)
        note = f" (sampled at temperature {CANDIDATE_TEMPERATURE}: greedy would repeat it)"
    try:
        stream = service.start_candidate(session.id, len(session.messages) - 1, params)
    except MiniClaudeError as exc:
        raise gr.Error(str(exc)) from None
    text = ""
    deltas = iter(stream)
    try:
        for delta in deltas:
            text += delta
            yield text, None, "_writing another reply…_"
    except MiniClaudeError as exc:
        raise gr.Error(str(exc)) from None
    finally:
        finish_on_stop(stream, deltas)
    yield text, stream.candidate_id, f"Which reply is better?{note}"
