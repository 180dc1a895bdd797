"""Our messages -> Gradio's chat history, and the text of a message Gradio sends back (an
edit). The only place that knows Gradio's format.

Gradio 6 keeps history as ``[{"role": ..., "content": ...}]`` where content is a string or a
list of blocks such as ``{"type": "text", "text": ...}``; we always hand it plain role/content
dicts.
"""

from __future__ import annotations

from typing import Any


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    return "" if content is None else str(content)


def messages_to_history(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]
