"""Anthropic Messages requests into the core's types, and the core's results into Anthropic's
shapes: the message, and the event sequence of a streamed one.

The edge of the protocol: everything here only translates. The conversation, sampling, the
tool-call grammar and limits are the core's, shared with the OpenAI routes.
"""

from __future__ import annotations

import json
from typing import Any

from src.chat.conversation import Conversation
from src.chat.deltas import Delta
from src.chat.service import ChatResult
from src.chat.tools import Tool, ToolSet
from src.config import Settings
from src.errors import InvalidRequestError
from src.params import GenerationParams, check_reply_length, make_params
from src.web.anthropic_schemas import (
    ContentBlock,
    CountTokensRequest,
    Message,
    MessageIn,
    MessagesRequest,
    StopReason,
    TextBlockOut,
    ToolUseBlockOut,
    Usage,
)
from src.web.security import check_chars, check_history_length

READABLE_BLOCKS = "text, tool_use (assistant) and tool_result (user) blocks"


def anthropic_conversation(body: CountTokensRequest, settings: Settings) -> Conversation:
    """``system`` is the system prompt; each message becomes the core's messages in order
    (a user message's tool results become tool messages ahead of its text)."""
    system_prompt = blocks_text(body.system, "system")
    check_chars("system", system_prompt, settings.max_message_chars, "system")
    messages: list[dict[str, Any]] = []
    for number, message in enumerate(body.messages):
        messages += core_messages(message, f"messages[{number}]", settings)
    check_history_length(len(messages), settings.max_history_messages)
    if body.messages[-1].role != "user":
        raise InvalidRequestError(
            f"messages[{len(body.messages) - 1}]: the last message must be the user's (a reply "
            "cannot be prefilled by ending with an assistant message here)",
            "messages",
        )
    return Conversation(system_prompt=system_prompt, messages=messages)


def blocks_text(content: str | list[ContentBlock] | None, where: str) -> str | None:
    """Text content: a string, or ``text`` blocks joined by newlines."""
    if content is None or isinstance(content, str):
        return content
    texts = []
    for number, block in enumerate(content):
        if block.type != "text" or block.text is None:
            raise unreadable(block, f"{where}[{number}]", "text blocks")
        texts.append(block.text)
    return "\n".join(texts)


def unreadable(block: ContentBlock, where: str, readable: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"{where}: a {block.type!r} block cannot be read here: this model reads {readable}",
        "messages",
    )


def core_messages(message: MessageIn, where: str, settings: Settings) -> list[dict[str, Any]]:
    if isinstance(message.content, str):
        check_chars(f"{where}.content", message.content, settings.max_message_chars, "messages")
        return [{"role": message.role, "content": message.content}]
    if not message.content:
        raise InvalidRequestError(f"{where}.content: must not be empty", "messages")
    texts: list[str] = []
    results: list[dict[str, Any]] = []  # tool messages, from a user's tool_result blocks
    calls: list[dict[str, Any]] = []  # an assistant's tool_use blocks
    for number, block in enumerate(message.content):
        place = f"{where}.content[{number}]"
        if block.type == "text" and block.text is not None:
            texts.append(block.text)
        elif block.type == "tool_result" and message.role == "user":
            results.append(tool_message(block, place, settings))
        elif block.type == "tool_use" and message.role == "assistant":
            calls.append(tool_call(block, place))
        else:
            raise unreadable(block, place, READABLE_BLOCKS)
    text = "\n".join(texts)
    check_chars(f"{where}.content", text, settings.max_message_chars, "messages")
    if message.role == "assistant":
        reply: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            reply["tool_calls"] = calls
        return [reply]
    return results + ([{"role": "user", "content": text}] if texts else [])


def tool_message(block: ContentBlock, where: str, settings: Settings) -> dict[str, Any]:
    if not block.tool_use_id:
        raise InvalidRequestError(f"{where}: a tool_result block needs tool_use_id", "messages")
    text = blocks_text(block.content, f"{where}.content") or ""
    if block.is_error:
        text = f"Error: {text}"  # the model reads that the call failed
    check_chars(f"{where}.content", text, settings.max_message_chars, "messages")
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": text}


def tool_call(block: ContentBlock, where: str) -> dict[str, Any]:
    if not block.id or not block.name or block.input is None:
        raise InvalidRequestError(f"{where}: a tool_use block needs id, name and input", "messages")
    arguments = json.dumps(block.input, ensure_ascii=False)
    return {
        "id": block.id,
        "type": "function",
        "function": {"name": block.name, "arguments": arguments},
    }


def anthropic_tools(body: CountTokensRequest) -> ToolSet | None:
    """``tools`` and ``tool_choice``: ``any`` is a call to some tool, ``tool`` a call to the
    one named, ``disable_parallel_tool_use`` one call at most."""
    if not body.tools and body.tool_choice is None:
        return None
    tools = tuple(
        Tool(tool.name, tool.description or "", tool.input_schema) for tool in body.tools or []
    )
    choice = body.tool_choice
    parallel = not (choice is not None and choice.disable_parallel_tool_use)
    if choice is None or choice.type in ("auto", "none"):
        mode = "none" if choice is not None and choice.type == "none" else "auto"
        return ToolSet(tools, mode if tools else "none", parallel=parallel)
    if choice.type == "any":
        return ToolSet(tools, "required", parallel=parallel)
    if not choice.name:
        raise InvalidRequestError("tool_choice: type 'tool' needs the tool's name", "tool_choice")
    return ToolSet(tools, "function", choice.name, parallel=parallel)


def anthropic_params(
    body: MessagesRequest, defaults: GenerationParams, max_tokens_limit: int | None
) -> GenerationParams:
    """Sampling settings a request leaves out keep the server's defaults, as on every route."""
    if max_tokens_limit is not None:
        check_reply_length(body.max_tokens, "max_tokens", max_tokens_limit)
    values = defaults.model_dump()
    values["max_new_tokens"] = body.max_tokens
    if body.temperature is not None:
        values["temperature"] = body.temperature
        values["do_sample"] = body.temperature > 0  # temperature 0: greedy
    if body.top_p is not None:
        values["top_p"] = body.top_p
    if body.top_k is not None:
        values["top_k"] = body.top_k
    if body.stop_sequences is not None:
        values["stop"] = body.stop_sequences
    if body.output_schema is not None:
        values["response_format"] = {
            "type": "json_schema",
            "json_schema": body.output_schema,
            "name": "reply",
        }
    return make_params(values)


# ---- results -> Anthropic shapes -------------------------------------------------------------


def stop_reason(result: ChatResult) -> StopReason:
    if result.tool_calls:
        return "tool_use"
    if result.finish_reason in ("length", "cancelled"):
        return "max_tokens"
    return "stop_sequence" if result.stop_sequence is not None else "end_turn"


def anthropic_message(result: ChatResult, message_id: str, model: str) -> Message:
    content: list[TextBlockOut | ToolUseBlockOut] = []
    if result.text or not result.tool_calls:
        content.append(TextBlockOut(text=result.text))
    content += [
        ToolUseBlockOut(id=call.id, name=call.name, input=json.loads(call.arguments))
        for call in result.tool_calls
    ]
    return Message(
        id=message_id,
        model=model,
        content=content,
        stop_reason=stop_reason(result),
        stop_sequence=result.stop_sequence,
        usage=Usage(input_tokens=result.prompt_tokens, output_tokens=result.completion_tokens),
    )


Event = tuple[str, dict[str, Any]]  # (event name, data)


class MessageEvents:
    """A streamed reply as Anthropic's events: ``message_start``, then for each content block
    ``content_block_start``, its deltas (``text_delta``, or ``input_json_delta`` for a tool
    call's input) and ``content_block_stop``; at the end ``message_delta`` (the stop reason,
    the token counts) and ``message_stop``."""

    def __init__(self, message_id: str, model: str, input_tokens: int | None) -> None:
        self.message_id = message_id
        self.model = model
        self.input_tokens = input_tokens or 0
        self.blocks = 0  # content blocks started so far
        self.open: str | None = None  # the kind of the block now open: "text" or "tool_use"

    def start(self) -> list[Event]:
        message = Message(
            id=self.message_id,
            model=self.model,
            content=[],
            stop_reason=None,
            usage=Usage(input_tokens=self.input_tokens, output_tokens=0),
        )
        return [
            ("message_start", {"type": "message_start", "message": message.model_dump()}),
            ("ping", {"type": "ping"}),
        ]

    def delta(self, delta: Delta) -> list[Event]:
        events: list[Event] = []
        if delta.text:
            if self.open != "text":
                events += self._begin({"type": "text", "text": ""}, "text")
            events.append(self._delta({"type": "text_delta", "text": delta.text}))
        for call in delta.tool_calls:
            if call.name is not None:  # a new call begins
                block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
                events += self._begin(block, "tool_use")
            if call.arguments:
                events.append(
                    self._delta({"type": "input_json_delta", "partial_json": call.arguments})
                )
        return events

    def finish(self, result: ChatResult) -> list[Event]:
        events = self._begin({"type": "text", "text": ""}, "text") if not self.blocks else []
        events += self._close()
        usage = {"input_tokens": result.prompt_tokens, "output_tokens": result.completion_tokens}
        stop = {"stop_reason": stop_reason(result), "stop_sequence": result.stop_sequence}
        events.append(("message_delta", {"type": "message_delta", "delta": stop, "usage": usage}))
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def _begin(self, block: dict[str, Any], kind: str) -> list[Event]:
        events = self._close()
        self.open = kind
        self.blocks += 1
        start = {"type": "content_block_start", "index": self.blocks - 1, "content_block": block}
        return events + [("content_block_start", start)]

    def _delta(self, delta: dict[str, Any]) -> Event:
        data = {"type": "content_block_delta", "index": self.blocks - 1, "delta": delta}
        return ("content_block_delta", data)

    def _close(self) -> list[Event]:
        if self.open is None:
            return []
        self.open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self.blocks - 1})]
