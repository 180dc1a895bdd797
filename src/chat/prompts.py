"""Conversation history -> token ids, in the model's own format, fitted to the context window.

Two formats, chosen from the tokenizer (never from the model's name):
- CHAT_TEMPLATE: the tokenizer's Jinja chat template (SmolLM2, Llama, most instruct models),
  with an optional system prompt.
- EOS_JOINED: DialoGPT's format, each turn's text followed by the EOS token, no roles and no
  system prompt (Zhang et al., 2020, "DialoGPT").

Messages are OpenAI-shaped dicts: ``role`` is "system", "developer" (treated as system),
"user", "assistant" or "tool"; an assistant message may carry ``tool_calls``; ``content`` may be
None beside them. Roles may repeat (two user messages in a row are passed to the template as
they are, or merged when the template refuses them). Tool calls and results are written in the
format of ``src/chat/tools.py`` unless the template presents tools itself.

Training formats conversations with ``encode_conversation`` too, so training and chat agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from src.chat.text_encoding import (
    Segment,
    encode_segments,
    mark_contents,
    split_rendered,
)
from src.chat.tools import (
    Tool,
    parse_arguments,
    render_tool_calls,
    render_tool_results,
    tools_system_prompt,
)
from src.errors import ContextOverflowError, InvalidRequestError, ModelLoadingError

Message = dict[str, Any]  # {"role": ..., "content": "..."} (+ "tool_calls", "tool_call_id")


class PromptFormat(StrEnum):
    CHAT_TEMPLATE = "chat_template"
    EOS_JOINED = "eos_joined"


def detect_prompt_format(tokenizer: Any) -> PromptFormat:
    if getattr(tokenizer, "chat_template", None):
        return PromptFormat.CHAT_TEMPLATE
    if tokenizer.eos_token_id is None:
        raise ModelLoadingError(
            "The tokenizer has neither a chat template nor an EOS token, so turns cannot be "
            "separated. Use a chat model, or add a chat_template to tokenizer_config.json."
        )
    return PromptFormat.EOS_JOINED


def template_supports_tools(tokenizer: Any) -> bool:
    """Whether the chat template presents a ``tools`` list itself."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def encode_conversation(
    tokenizer: Any,
    prompt_format: PromptFormat,
    system_prompt: str | None,
    messages: list[Message],
    add_generation_prompt: bool = True,
    tools: tuple[Tool, ...] = (),
    memo: dict[Segment, list[int]] | None = None,
) -> list[int]:
    """Token ids of the whole conversation, ready for the model to write the next reply.
    ``memo`` keeps each piece's ids for the next call (``build_prompt``'s tries)."""
    if prompt_format is PromptFormat.EOS_JOINED:
        ids: list[int] = []
        for text in _turn_texts(messages):
            ids += encode_segments(tokenizer, [(text, True)], memo)[0]  # never a control token
            ids.append(tokenizer.eos_token_id)
        return ids
    segments = conversation_segments(
        tokenizer, prompt_format, system_prompt, messages, add_generation_prompt, tools
    )
    return encode_segments(tokenizer, segments, memo)[0]


def conversation_segments(
    tokenizer: Any,
    prompt_format: PromptFormat,
    system_prompt: str | None,
    messages: list[Message],
    add_generation_prompt: bool = True,
    tools: tuple[Tool, ...] = (),
) -> list[Segment]:
    """The conversation as the model sees it, in pieces: the format's own text (with its
    control tokens) and each message's text (to be encoded as text only: see
    ``src/chat/text_encoding.py``)."""
    if prompt_format is not PromptFormat.CHAT_TEMPLATE:
        raise ValueError(f"{prompt_format} has no template to render")
    chat, options = template_input(tokenizer, system_prompt, messages, tools)
    try:
        return _render_segments(tokenizer, chat, add_generation_prompt, options)
    except InvalidRequestError:
        raise
    except Exception as exc:  # jinja2's TemplateError: e.g. "roles must alternate"
        merged = _merge_consecutive(chat)
        if merged == chat:
            raise InvalidRequestError(
                f"messages: the model's chat template cannot render them: {exc}", "messages"
            ) from None
        return _render_segments(tokenizer, merged, add_generation_prompt, options)


def _render_segments(
    tokenizer: Any, chat: list[Message], add_generation_prompt: bool, options: dict[str, Any]
) -> list[Segment]:
    marked_chat, texts = mark_contents(chat)
    marked = _render(tokenizer, marked_chat, add_generation_prompt, options)
    real = _render(tokenizer, chat, add_generation_prompt, options)
    return split_rendered(marked, texts, real, tokenizer)


def template_input(
    tokenizer: Any, system_prompt: str | None, messages: list[Message], tools: tuple[Tool, ...]
) -> tuple[list[Message], dict[str, Any]]:
    """(messages, options) for ``apply_chat_template``: the system prompt first (with the
    tools listed in it when the template cannot show them itself), the messages in the
    template's terms."""
    native_tools = bool(tools) and template_supports_tools(tokenizer)
    if tools and not native_tools:
        shown = tools_system_prompt(tools)
        system_prompt = f"{system_prompt}\n\n{shown}" if system_prompt else shown
    chat = [{"role": "system", "content": system_prompt}] if system_prompt else []
    chat += _template_messages(messages, native_tools)
    options = {"tools": [tool.as_openai() for tool in tools]} if native_tools else {}
    return chat, options


def _render(
    tokenizer: Any, chat: list[Message], add_generation_prompt: bool, options: dict[str, Any]
) -> str:
    return tokenizer.apply_chat_template(
        chat, add_generation_prompt=add_generation_prompt, tokenize=False, **options
    )


def _template_messages(messages: list[Message], native_tools: bool) -> list[Message]:
    """Messages as the template gets them: developer -> system; tool calls and results in the
    default format unless the template handles tools itself; no None content."""
    chat: list[Message] = []
    results: list[str] = []  # consecutive tool results, shown as one user turn
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        calls = message.get("tool_calls") or []
        if native_tools and (calls or role == "tool"):
            chat.append(_native_tool_message(message, content))
            continue
        if role == "tool":
            if not results:
                chat.append({"role": "user", "content": ""})
            results.append(content)
            chat[-1]["content"] = render_tool_results(results)
            continue
        results = []
        if calls:
            content = "\n".join(part for part in (content, render_tool_calls(calls)) if part)
        chat.append({"role": "system" if role == "developer" else role, "content": content})
    return chat


def _native_tool_message(message: Message, content: str) -> Message:
    if message["role"] == "tool":
        return {"role": "tool", "content": content, "tool_call_id": message.get("tool_call_id")}
    calls = []
    for call in message["tool_calls"]:
        function = call.get("function", call)
        arguments = parse_arguments(function.get("arguments") or {})
        calls.append({"type": "function", "function": {**function, "arguments": arguments}})
    return {"role": "assistant", "content": content, "tool_calls": calls}


def _merge_consecutive(chat: list[Message]) -> list[Message]:
    """Join consecutive messages of the same role (for templates that refuse them)."""
    merged: list[Message] = []
    for message in chat:
        if merged and merged[-1]["role"] == message["role"] and "tool_calls" not in message:
            merged[-1] = {
                **merged[-1],
                "content": f"{merged[-1]['content']}\n\n{message['content']}",
            }
        else:
            merged.append(dict(message))
    return merged


def _turn_texts(messages: list[Message]) -> list[str]:
    """DialoGPT's turns: each message's text (no roles, no system messages)."""
    texts = []
    for message in messages:
        if message["role"] in ("system", "developer"):
            continue
        content = message.get("content") or ""
        if message.get("tool_calls"):
            content = "\n".join(p for p in (content, render_tool_calls(message["tool_calls"])) if p)
        if message["role"] == "tool":
            content = render_tool_results([content])
        texts.append(content)
    return texts


@dataclass
class PromptBuild:
    input_ids: list[int]
    dropped_messages: int  # oldest messages left out to fit the context window


def build_prompt(
    tokenizer: Any,
    prompt_format: PromptFormat,
    system_prompt: str | None,
    messages: list[Message],
    max_prompt_tokens: int,
    tools: tuple[Tool, ...] = (),
) -> PromptBuild:
    """Encode ``messages`` (ending with what the model answers), dropping the oldest turns first.

    The system prompt and the last turn (from the last user message on) are always kept;
    earlier messages go a turn at a time, so the prompt still starts with a user message.

    It costs about one tokenization of the conversation however long it is: the newest turn
    is tried first (a prompt that cannot fit is refused at once), the longest suffix that fits
    is found by bisection (a prompt only shrinks as turns are dropped), and each message's
    text is tokenized once for all the tries (only the template's short pieces between them
    are tokenized again).
    """
    starts = [0] + [
        index
        for index, message in enumerate(messages)
        if index > 0 and message["role"] == "user" and _is_turn_start(messages, index)
    ]
    memo: dict[Segment, list[int]] = {}

    def encode_from(start: int) -> list[int]:
        return encode_conversation(
            tokenizer, prompt_format, system_prompt, messages[start:], tools=tools, memo=memo
        )

    newest = encode_from(starts[-1])
    if len(newest) > max_prompt_tokens:
        raise ContextOverflowError(
            f"message: needs {len(newest)} prompt tokens, but only {max_prompt_tokens} fit the "
            "context window after reserving max_new_tokens. Shorten the message (or the "
            "system prompt), or lower max_new_tokens.",
            field="message",
        )
    fits, fitting_ids = len(starts) - 1, newest  # the earliest start known to fit
    too_long = -1  # the latest start known not to fit
    while fits - too_long > 1:
        middle = (fits + too_long) // 2
        ids = encode_from(starts[middle])
        if len(ids) <= max_prompt_tokens:
            fits, fitting_ids = middle, ids
        else:
            too_long = middle
    return PromptBuild(fitting_ids, dropped_messages=starts[fits])


def _is_turn_start(messages: list[Message], index: int) -> bool:
    """A user message right after another user message continues the same turn."""
    return messages[index - 1]["role"] != "user"


IGNORE_INDEX = -100  # label of tokens the loss skips (PyTorch's cross_entropy default)


def encode_for_training(
    tokenizer: Any,
    prompt_format: PromptFormat,
    system_prompt: str | None,
    messages: list[Message],
    tools: tuple[Tool, ...] = (),
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a whole conversation for fine-tuning.

    Built from ``encode_conversation`` (what chat uses at inference), so the two can never
    disagree. Labels are the token ids for every assistant reply, including its end-of-turn
    token (so the model learns to stop), and ``IGNORE_INDEX`` everywhere else: the model is
    trained to answer, not to write the user's messages. An assistant message's tool calls
    are part of its reply, in the format the model is served with.
    """
    if prompt_format is PromptFormat.CHAT_TEMPLATE and getattr(tokenizer, "is_fast", False):
        fast = _encode_for_training_by_offsets(tokenizer, system_prompt, messages, tools)
        if fast is not None:
            return fast
    ids = encode_conversation(
        tokenizer, prompt_format, system_prompt, messages, add_generation_prompt=False, tools=tools
    )
    labels = [IGNORE_INDEX] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = encode_conversation(
            tokenizer, prompt_format, system_prompt, messages[:index], True, tools
        )
        through = encode_conversation(
            tokenizer, prompt_format, system_prompt, messages[: index + 1], False, tools
        )
        if ids[: len(through)] != through or through[: len(before)] != before:
            raise ValueError(
                "the chat template does not encode a conversation's beginning the same way as "
                "the whole conversation, so assistant tokens cannot be located for training"
            )
        labels[len(before) : len(through)] = through[len(before) :]
    return ids, labels


def _encode_for_training_by_offsets(
    tokenizer: Any,
    system_prompt: str | None,
    messages: list[Message],
    tools: tuple[Tool, ...] = (),
) -> tuple[list[int], list[int]] | None:
    """The same result as the exact path, tokenizing once instead of twice per reply.

    Rendering a template prefix as text is cheap; tokenizing is not. So: render the whole
    conversation and, for each assistant reply, the text before and through it; tokenize the
    whole conversation once (in its pieces, see ``encode_segments``), with character offsets,
    and label the tokens inside each reply. Returns None (use the exact path) if a prefix is
    not a prefix of the text, a token straddles a reply's boundary, or the tokenizer gives no
    offsets.
    """

    def render(part: list[Message], generation_prompt: bool) -> str:
        chat, options = template_input(tokenizer, system_prompt, part, tools)
        return _render(tokenizer, chat, generation_prompt, options)

    try:
        segments = conversation_segments(
            tokenizer, PromptFormat.CHAT_TEMPLATE, system_prompt, messages, False, tools
        )
        text = render(messages, False)
    except Exception:  # a template that refuses the roles: the exact path merges them
        return None
    spans = []
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            before, through = render(messages[:index], True), render(messages[: index + 1], False)
            if not (text.startswith(before) and text.startswith(through)):
                return None
            spans.append((len(before), len(through)))
    if "".join(piece for piece, _ in segments) != text:
        return None
    ids, offsets = encode_segments(tokenizer, segments)
    if offsets is None:
        return None
    labels = [IGNORE_INDEX] * len(ids)
    for position, (start, end) in enumerate(offsets):
        for span_start, span_end in spans:
            if start < span_start < end or start < span_end < end:
                return None  # a token crosses the boundary: only the exact path is safe
            if span_start <= start and end <= span_end and end > start:
                labels[position] = ids[position]
    return ids, labels
