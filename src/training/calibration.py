"""The conversations perplexity is measured on (QUANTIZE=auto's choice, the benchmark): the
last ones of the bundled chitchat data, encoded by the prompt encoder that serves and trains
the model, assistant tokens labelled."""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

from src.chat.prompts import detect_prompt_format
from src.training.data import Example, load_examples, tokenize_examples

CALIBRATION_CONVERSATIONS = 16
CALIBRATION_TOKENS = 128  # each conversation cut to this length
OPENING_MESSAGES = 12  # more than 128 tokens of this chitchat data; an even count ends a reply


def calibration_examples(
    tokenizer: Any,
    conversations: int = CALIBRATION_CONVERSATIONS,
    max_tokens: int = CALIBRATION_TOKENS,
) -> list[dict[str, list[int]]]:
    """The last ``conversations`` of the bundled chitchat data in the model's own format."""
    prompt_format = detect_prompt_format(tokenizer)
    chosen = list(openings(conversations))
    return tokenize_examples(chosen, tokenizer, prompt_format, max_tokens, 0.0, seed=0).train


@functools.cache
def openings(conversations: int) -> tuple[Example, ...]:
    """The last ``conversations`` of the chitchat data, each cut to its opening messages: the
    first turns are all that is encoded (the training encoder's time grows with the square of
    the turns), and they are read once per process."""
    return tuple(
        replace(example, messages=example.messages[:OPENING_MESSAGES])
        for example in load_examples("chitchat")[-conversations:]
    )
