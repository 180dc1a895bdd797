"""OpenAI requests into the core's types, and the core's results into OpenAI's shapes.

The edge of the OpenAI protocol: everything here only translates. Sampling, grammars, tools,
logprobs and limits live in the core (``src/params.py``, ``src/engine/``, ``src/chat/``).
"""

from __future__ import annotations

import secrets
from typing import Any

from src.chat.conversation import Conversation
from src.chat.deltas import TokenInfo
from src.chat.service import ChatResult
from src.chat.tools import Tool, ToolCall, ToolCallDelta, ToolSet
from src.config import Settings
from src.errors import InvalidRequestError
from src.params import GenerationParams, check_reply_length, make_params
from src.web.openai_schemas import (
    ChatCompletionRequest,
    ChatMessage,
    ChoiceLogprobs,
    CompletionRequest,
    CompletionUsage,
    FunctionCallOut,
    TokenLogprob,
    ToolCallOut,
    TopLogprob,
)
from src.web.security import check_chars, check_history_length


def message_text(content: Any, where: str) -> str | None:
    """A message's content as text: a string, or its ``text`` parts joined by newlines."""
    if content is None or isinstance(content, str):
        return content
    texts = []
    for number, part in enumerate(content):
        if part.type not in ("text", "input_text") or part.text is None:
            raise InvalidRequestError(
                f"{where}.content[{number}]: a {part.type!r} part cannot be read: this model "
                "reads text only (send 'text' parts)",
                "messages",
            )
        texts.append(part.text)
    return "\n".join(texts)


def openai_conversation(messages: list[ChatMessage], settings: Settings) -> Conversation:
    """OpenAI messages as a conversation: a leading system (or developer) message is its
    system prompt; every other message is kept in order, whatever its role."""
    given = len(messages)
    messages = list(messages)
    system_prompt = None
    if messages[0].role in ("system", "developer"):
        system_prompt = message_text(messages.pop(0).content, "messages[0]")
        check_chars(
            "messages[0].content", system_prompt or "", settings.max_message_chars, "messages"
        )
    offset = given - len(messages)
    if not messages:
        raise InvalidRequestError("messages: needs a message besides the system prompt", "messages")
    check_history_length(len(messages), settings.max_history_messages)
    converted = []
    for number, message in enumerate(messages, start=offset):
        converted.append(core_message(message, f"messages[{number}]", settings))
    return Conversation(system_prompt=system_prompt, messages=converted)


def core_message(message: ChatMessage, where: str, settings: Settings) -> dict[str, Any]:
    text = message_text(message.content, where)
    check_chars(f"{where}.content", text or "", settings.max_message_chars, "messages")
    role = message.role
    if role == "function":  # legacy: a function's result
        role = "tool"
    result: dict[str, Any] = {"role": role, "content": text}
    if role == "tool":
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequestError(f"{where}: a tool message needs tool_call_id", "messages")
        result["tool_call_id"] = message.tool_call_id or message.name
        result["content"] = text or ""
        return result
    calls = [
        {"id": c.id, "type": "function", "function": c.function.model_dump()}
        for c in message.tool_calls or []
    ]
    if message.function_call is not None:
        calls.append(
            {
                "id": f"call_{secrets.token_hex(8)}",
                "type": "function",
                "function": message.function_call.model_dump(),
            }
        )
    if calls:
        if role != "assistant":
            raise InvalidRequestError(
                f"{where}: only assistant messages carry tool_calls", "messages"
            )
        result["tool_calls"] = calls
    elif text is None:
        if role != "assistant":
            raise InvalidRequestError(
                f"{where}.content: is required for a {role} message", "messages"
            )
        result["content"] = ""
    return result


def openai_tools(body: ChatCompletionRequest) -> ToolSet | None:
    """``tools`` and ``tool_choice`` (or the legacy ``functions`` and ``function_call``)."""
    definitions = [tool.function for tool in body.tools or []] + list(body.functions or [])
    if not definitions and body.tool_choice is None and body.function_call is None:
        return None
    tools = tuple(
        Tool(d.name, d.description or "", d.parameters or {"type": "object", "properties": {}})
        for d in definitions
    )
    choice = body.tool_choice if body.tool_choice is not None else body.function_call
    if choice is None:
        return ToolSet(tools, "auto" if tools else "none", parallel=_parallel(body))
    if isinstance(choice, str):
        return ToolSet(tools, choice, parallel=_parallel(body))
    name = choice.function.name if hasattr(choice, "function") else choice.name
    return ToolSet(tools, "function", name, parallel=_parallel(body))


def _parallel(body: ChatCompletionRequest) -> bool:
    if body.functions:  # legacy functions: one call per reply
        return False
    return body.parallel_tool_calls is not False


def sampling_values(body: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    """The sampling fields both endpoints share, as ``GenerationParams`` values."""
    values: dict[str, Any] = {}
    if body.temperature is not None:
        values["temperature"] = body.temperature
        values["do_sample"] = body.temperature > 0  # OpenAI: temperature 0 is (near) greedy
    for name in ("top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "min_p"):
        if getattr(body, name) is not None:
            values[name] = getattr(body, name)
    if body.top_k is not None:
        values["top_k"] = 0 if body.top_k == -1 else body.top_k  # vLLM: -1 means off
    if body.repetition_penalty is not None:
        values["repetition_penalty"] = body.repetition_penalty
    if body.logit_bias:
        values["logit_bias"] = _token_biases(body.logit_bias)
    return values


def _token_biases(biases: dict[str, float]) -> dict[int, float]:
    result = {}
    for key, bias in biases.items():
        try:
            result[int(key)] = bias
        except ValueError:
            raise InvalidRequestError(
                f"logit_bias: {key!r} is not a token id (keys are token ids, as strings)",
                "logit_bias",
            ) from None
    return result


def openai_params(
    body: ChatCompletionRequest, defaults: GenerationParams, max_tokens_limit: int | None = None
) -> GenerationParams:
    values = defaults.model_dump()
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens_limit is not None:
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        check_reply_length(max_tokens, field, max_tokens_limit)
    if max_tokens is not None:
        values["max_new_tokens"] = max_tokens
    values.update(sampling_values(body))
    if body.top_logprobs is not None:
        if not body.logprobs:
            raise InvalidRequestError("top_logprobs: needs logprobs set to true", "top_logprobs")
        values["top_logprobs"] = body.top_logprobs
    values["logprobs"] = bool(body.logprobs)
    if body.response_format is not None:
        values["response_format"] = body.response_format.to_core()
    return make_params(values)


def check_choices(n: int, settings: Settings) -> None:
    if n > settings.max_choices:
        raise InvalidRequestError(
            f"n: {n} choices is over the limit of {settings.max_choices} (MAX_CHOICES)", "n"
        )


# ---- results -> OpenAI shapes --------------------------------------------------------------


def finish_reason(result: ChatResult, legacy_functions: bool = False) -> str:
    if result.tool_calls:
        return "function_call" if legacy_functions else "tool_calls"
    return "length" if result.finish_reason == "length" else "stop"


def tool_calls_out(calls: list[ToolCall]) -> list[ToolCallOut] | None:
    if not calls:
        return None
    return [
        ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
        for c in calls
    ]


def logprobs_out(tokens: list[TokenInfo] | None, top: int) -> ChoiceLogprobs | None:
    if tokens is None:
        return None
    return ChoiceLogprobs(content=[token_logprob(token, top) for token in tokens])


def token_logprob(token: TokenInfo, top: int) -> TokenLogprob:
    return TokenLogprob(
        token=token.token,
        logprob=token.logprob if token.logprob is not None else 0.0,
        bytes=list(token.bytes),
        top_logprobs=[
            TopLogprob(token=text, logprob=logprob, bytes=list(raw))
            for text, raw, logprob in token.top[:top]
        ],
    )


def tool_call_chunks(deltas: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """Tool-call deltas as OpenAI streams them: the first with id, type and name."""
    chunks = []
    for delta in deltas:
        if delta.name is not None:
            chunks.append(
                {
                    "index": delta.index,
                    "id": delta.id,
                    "type": "function",
                    "function": {"name": delta.name, "arguments": delta.arguments},
                }
            )
        else:
            chunks.append({"index": delta.index, "function": {"arguments": delta.arguments}})
    return chunks


def usage_of(results: list[ChatResult]) -> CompletionUsage:
    """The prompt counts once, however many choices were generated from it."""
    prompt = results[0].prompt_tokens if results else 0
    completion = sum(result.completion_tokens for result in results)
    return CompletionUsage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def stream_chunk(
    kind: str, completion_id: str, created: int, model: str, choice: dict[str, Any]
) -> dict[str, Any]:
    """One streamed chunk of either endpoint (``kind``: its ``object``), holding one choice."""
    return {
        "id": completion_id,
        "object": kind,
        "created": created,
        "model": model,
        "choices": [choice],
    }
