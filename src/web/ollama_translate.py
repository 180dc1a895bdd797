"""Ollama requests into the core's types, and the core's results into Ollama's shapes (one
JSON object, or newline-delimited JSON chunks when streamed).

The edge of the protocol: everything here only translates. Sampling, the grammars of
``format`` and tools, and limits are the core's, shared with the other protocols.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from src.chat.conversation import Conversation
from src.chat.deltas import TokenInfo
from src.chat.service import ChatResult
from src.chat.tools import Tool, ToolCall, ToolSet
from src.config import Settings
from src.errors import InvalidRequestError
from src.params import GenerationParams, check_reply_length, make_params
from src.web.ollama_schemas import ChatMessage, ChatRequest, GenerateRequest, GenerationRequest
from src.web.openai_translate import token_logprob
from src.web.security import check_chars, check_history_length


def ollama_conversation(body: ChatRequest, settings: Settings) -> Conversation:
    """A leading system message is the system prompt; the other messages stay in order. An
    assistant's earlier tool calls get ids, and each tool message answers the call of its
    ``tool_name`` (Ollama's messages carry no call ids)."""
    messages = list(body.messages)
    system_prompt = None
    offset = 0
    if messages and messages[0].role == "system":
        system_prompt = messages.pop(0).content
        check_chars("messages[0].content", system_prompt, settings.max_message_chars, "messages")
        offset = 1
    if not messages:
        raise InvalidRequestError("messages: needs a message besides the system prompt", "messages")
    check_history_length(len(messages), settings.max_history_messages)
    converted = [
        core_message(message, f"messages[{number}]", settings)
        for number, message in enumerate(messages, start=offset)
    ]
    if converted[-1]["role"] == "assistant":
        raise InvalidRequestError(
            f"messages[{len(body.messages) - 1}]: the last message must be the user's or a "
            "tool's (a reply cannot be continued here)",
            "messages",
        )
    return Conversation(system_prompt=system_prompt, messages=converted)


def core_message(message: ChatMessage, where: str, settings: Settings) -> dict[str, Any]:
    if message.images:
        raise InvalidRequestError(
            f"{where}.images: this model reads text only (send the message without images)",
            "messages",
        )
    check_chars(f"{where}.content", message.content, settings.max_message_chars, "messages")
    if message.role == "tool":
        call_id = message.tool_call_id or message.tool_name or ""
        return {"role": "tool", "tool_call_id": call_id, "content": message.content}
    result: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        if message.role != "assistant":
            raise InvalidRequestError(
                f"{where}: only assistant messages carry tool_calls", "messages"
            )
        result["tool_calls"] = [
            {
                # What a later tool message names: the id, or Ollama's tool_name.
                "id": call.id or call.function.name,
                "type": "function",
                "function": {
                    "name": call.function.name,
                    "arguments": json.dumps(call.function.arguments, ensure_ascii=False),
                },
            }
            for call in message.tool_calls
        ]
    return result


def ollama_tools(body: ChatRequest) -> ToolSet | None:
    """Ollama has no tool_choice: with tools, the model decides (``auto``)."""
    if not body.tools:
        return None
    tools = tuple(
        Tool(
            tool.function.name,
            tool.function.description or "",
            tool.function.parameters or {"type": "object", "properties": {}},
        )
        for tool in body.tools
    )
    return ToolSet(tools, "auto")


def ollama_params(
    body: GenerationRequest, defaults: GenerationParams, max_reply_tokens: int | None
) -> GenerationParams:
    """``options`` in Ollama's names; what a request leaves out keeps the server's default."""
    values = defaults.model_dump()
    options = body.options
    if options is not None:
        if options.num_predict is not None:
            values["max_new_tokens"] = reply_length(options.num_predict, max_reply_tokens)
        if options.temperature is not None:
            values["temperature"] = options.temperature
            values["do_sample"] = options.temperature > 0  # Ollama: 0 is greedy
        renamed = {"repeat_penalty": "repetition_penalty"}
        for name in (
            "top_k",
            "top_p",
            "min_p",
            "seed",
            "stop",
            "repeat_penalty",
            "presence_penalty",
            "frequency_penalty",
        ):
            if getattr(options, name) is not None:
                values[renamed.get(name, name)] = getattr(options, name)
    if body.format == "json":
        values["response_format"] = {"type": "json_object"}
    elif isinstance(body.format, dict):
        values["response_format"] = {
            "type": "json_schema",
            "json_schema": body.format,
            "name": "reply",
        }
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs: needs logprobs set to true", "top_logprobs")
    values["logprobs"] = bool(body.logprobs)
    if body.top_logprobs is not None:
        values["top_logprobs"] = body.top_logprobs
    return make_params(values)


def reply_length(num_predict: int, max_reply_tokens: int | None) -> int:
    """Ollama's ``num_predict``: a count, or -1 (and -2) for "as long as it may be", which is
    MAX_LENGTH here."""
    if num_predict < 0:
        if max_reply_tokens is None:
            raise InvalidRequestError(
                "options.num_predict: -1 needs a reply limit (MAX_LENGTH); send a count",
                "options.num_predict",
            )
        return max_reply_tokens
    if num_predict == 0:
        raise InvalidRequestError(
            "options.num_predict: a reply needs at least 1 token (or -1: as many as fit)",
            "options.num_predict",
        )
    if max_reply_tokens is not None:
        check_reply_length(num_predict, "options.num_predict", max_reply_tokens)
    return num_predict


def check_generate_fields(body: GenerateRequest) -> None:
    """Fields of /api/generate this server cannot honour are refused by name, not dropped."""
    for name, why in (
        ("suffix", "fill-in-the-middle is not supported"),
        ("template", "Ollama's Go templates are not read here: the model's chat template is used"),
        ("context", "Ollama's context tokens are deprecated: send the conversation to /api/chat"),
        ("images", "this model reads text only"),
    ):
        if getattr(body, name):
            raise InvalidRequestError(f"{name}: {why}", name)


# ---- results -> Ollama shapes ----------------------------------------------------------------


def now() -> str:
    """Ollama's ``created_at``: an RFC 3339 time in UTC."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def done_reason(result: ChatResult) -> str:
    return "length" if result.finish_reason in ("length", "cancelled") else "stop"


def timings(result: ChatResult) -> dict[str, int]:
    """Ollama's counts and durations (nanoseconds): the prompt's evaluation lasts until the
    first reply token, the reply's evaluation after it."""
    total = result.seconds
    first = result.first_token_seconds if result.first_token_seconds is not None else total
    return {
        "total_duration": int(total * 1e9),
        "load_duration": 0,  # the model was loaded at start-up
        "prompt_eval_count": result.prompt_tokens,
        "prompt_eval_duration": int(first * 1e9),
        "eval_count": result.completion_tokens,
        "eval_duration": int(max(total - first, 0.0) * 1e9),
    }


def tool_calls_out(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [
        {
            "id": call.id,
            "function": {
                "index": index,
                "name": call.name,
                "arguments": json.loads(call.arguments),
            },
        }
        for index, call in enumerate(calls)
    ]


def logprobs_out(tokens: list[TokenInfo], top: int) -> list[dict[str, Any]]:
    """Ollama's log-probabilities have OpenAI's per-token shape."""
    return [token_logprob(token, top).model_dump() for token in tokens]


def chat_message(text: str, calls: list[ToolCall] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = tool_calls_out(calls)
    return message


def final_chunk(model: str, result: ChatResult, body: dict[str, Any]) -> dict[str, Any]:
    """The last object: ``done`` with the reason, the counts and the durations."""
    return {
        "model": model,
        "created_at": now(),
        **body,
        "done": True,
        "done_reason": done_reason(result),
        **timings(result),
    }


def chunk(model: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "created_at": now(), **body, "done": False}


def loaded_reply(model: str, chat: bool) -> dict[str, Any]:
    """Ollama's answer to a request without a prompt: the model is loaded, nothing is
    generated (clients send one to load a model ahead of use)."""
    body = {"message": chat_message("")} if chat else {"response": ""}
    return {"model": model, "created_at": now(), **body, "done": True, "done_reason": "load"}
