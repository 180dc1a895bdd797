"""Gradio's chat history <-> our messages. The only place that knows Gradio's format.

Gradio 6 keeps history as ``[{"role": ..., "content": ...}]`` where content is a string or a
list of blocks such as ``{"type": "text", "text": ...}``; older versions used (user, bot)
pairs. All are accepted here; we always hand Gradio plain role/content dicts back.
"""

from __future__ import annotations

from typing import Any

from src.chat.conversation import Conversation


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    return "" if content is None else str(content)


def history_to_messages(history: list[Any] | None) -> list[dict[str, str]]:
    """Gradio history -> alternating user/assistant messages (incomplete turns dropped)."""
    flat: list[dict[str, str]] = []
    for item in history or []:
        if isinstance(item, (list, tuple)) and len(item) == 2:  # legacy (user, bot) pair
            flat += [
                {"role": "user", "content": text_of(item[0])},
                {"role": "assistant", "content": text_of(item[1])},
            ]
            continue
        role = item.get("role") if isinstance(item, dict) else getattr(item, "role", None)
        content = item.get("content") if isinstance(item, dict) else getattr(item, "content", "")
        if role in ("user", "assistant"):
            flat.append({"role": role, "content": text_of(content)})
    messages: list[dict[str, str]] = []
    for message in flat:  # keep strictly alternating pairs, as the chat core expects
        expected = "user" if len(messages) % 2 == 0 else "assistant"
        if message["role"] == expected:
            messages.append(message)
        elif expected == "assistant":  # two user messages in a row: keep the later one
            messages[-1] = message
    if len(messages) % 2:
        messages.pop()
    return messages


def history_to_conversation(history: list[Any] | None, system_prompt: str | None) -> Conversation:
    return Conversation(system_prompt=system_prompt or None, messages=history_to_messages(history))


def messages_to_history(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]
