"""Conversation history -> token ids, in the model's own format, fitted to the context window.

Two formats, chosen from the tokenizer (never from the model's name):
- CHAT_TEMPLATE: the tokenizer's Jinja chat template (SmolLM2, Llama, most instruct models),
  with an optional system prompt.
- EOS_JOINED: DialoGPT's format, each turn's text followed by the EOS token, no roles and no
  system prompt (Zhang et al., 2020, "DialoGPT").

Training formats conversations with ``encode_conversation`` too, so training and chat agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from src.errors import ContextOverflowError, ModelLoadingError

Message = dict[str, str]  # {"role": "user" | "assistant" | "system", "content": "..."}


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


def encode_conversation(
    tokenizer: Any,
    prompt_format: PromptFormat,
    system_prompt: str | None,
    messages: list[Message],
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of the whole conversation, ready for the model to write the next reply."""
    if prompt_format is PromptFormat.CHAT_TEMPLATE:
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        encoded = tokenizer.apply_chat_template(
            system + list(messages),
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=True,
        )
        return list(encoded["input_ids"])
    ids: list[int] = []
    for message in messages:
        ids += tokenizer.encode(message["content"], add_special_tokens=False)
        ids.append(tokenizer.eos_token_id)
    return ids


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
) -> PromptBuild:
    """Encode ``messages`` (ending with the new user message), dropping the oldest turns first.

    The system prompt and the newest user message are always kept; earlier messages go a
    user/assistant pair at a time, so the prompt still starts with a user turn.
    """
    start = 0
    while True:
        ids = encode_conversation(tokenizer, prompt_format, system_prompt, messages[start:])
        if len(ids) <= max_prompt_tokens:
            return PromptBuild(ids, dropped_messages=start)
        if start >= len(messages) - 1:
            raise ContextOverflowError(
                f"message: needs {len(ids)} prompt tokens, but only {max_prompt_tokens} fit the "
                "context window after reserving max_new_tokens. Shorten the message (or the "
                "system prompt), or lower max_new_tokens.",
                field="message",
            )
        start = min(start + 2, len(messages) - 1)


IGNORE_INDEX = -100  # label of tokens the loss skips (PyTorch's cross_entropy default)


def encode_for_training(
    tokenizer: Any,
    prompt_format: PromptFormat,
    system_prompt: str | None,
    messages: list[Message],
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a whole conversation for fine-tuning.

    Built from ``encode_conversation`` (what chat uses at inference), so the two can never
    disagree. Labels are the token ids for every assistant reply, including its end-of-turn
    token (so the model learns to stop), and ``IGNORE_INDEX`` everywhere else: the model is
    trained to answer, not to write the user's messages.
    """
    if prompt_format is PromptFormat.CHAT_TEMPLATE and getattr(tokenizer, "is_fast", False):
        fast = _encode_for_training_by_offsets(tokenizer, system_prompt, messages)
        if fast is not None:
            return fast
    ids = encode_conversation(
        tokenizer, prompt_format, system_prompt, messages, add_generation_prompt=False
    )
    labels = [IGNORE_INDEX] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = encode_conversation(
            tokenizer, prompt_format, system_prompt, messages[:index], add_generation_prompt=True
        )
        through = encode_conversation(
            tokenizer,
            prompt_format,
            system_prompt,
            messages[: index + 1],
            add_generation_prompt=False,
        )
        if ids[: len(through)] != through or through[: len(before)] != before:
            raise ValueError(
                "the chat template does not encode a conversation's beginning the same way as "
                "the whole conversation, so assistant tokens cannot be located for training"
            )
        labels[len(before) : len(through)] = through[len(before) :]
    return ids, labels


def _encode_for_training_by_offsets(
    tokenizer: Any, system_prompt: str | None, messages: list[Message]
) -> tuple[list[int], list[int]] | None:
    """The same result as the exact path, tokenizing once instead of twice per reply.

    Rendering a template prefix as text is cheap; tokenizing is not. So: render the whole
    conversation and, for each assistant reply, the text before and through it; tokenize the
    whole text once, with character offsets, and label the tokens inside each reply. Returns
    None (use the exact path) if a prefix is not a prefix of the text or a token straddles a
    reply's boundary.
    """
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []

    def render(part: list[Message], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            system + part, add_generation_prompt=generation_prompt, tokenize=False
        )

    text = render(messages, False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            before, through = render(messages[:index], True), render(messages[: index + 1], False)
            if not (text.startswith(before) and text.startswith(through)):
                return None
            spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [IGNORE_INDEX] * len(encoded["input_ids"])
    for position, (start, end) in enumerate(encoded["offset_mapping"]):
        for span_start, span_end in spans:
            if start < span_start < end or start < span_end < end:
                return None  # a token crosses the boundary: only the exact path is safe
            if span_start <= start and end <= span_end and end > start:
                labels[position] = encoded["input_ids"][position]
    return list(encoded["input_ids"]), labels
