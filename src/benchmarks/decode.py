"""Single-stream decoding speed: each of our engines and precisions against plain
transformers ``generate`` (fp32), same prompt, same number of new tokens, greedy, measured
side by side in one process. Medians of several repetitions. The baseline runs as its users
run it (``time_generate``); our engines and llama.cpp are timed token by token as they
stream (``time_stream``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from src.engine.batching import BatchingEngine
from src.params import GenerationParams


@dataclass
class DecodeResult:
    name: str
    tokens_per_second: float
    first_token_seconds: float
    tokens: list[int]


def time_stream(stream: Callable[[], Iterator[int]], repetitions: int) -> tuple[float, float, list]:
    """Median tokens/s (after the first token) and median time to first token."""
    speeds, firsts, tokens = [], [], []
    for _ in range(repetitions):
        started = time.perf_counter()
        first_at = None
        tokens = []
        for token in stream():
            tokens.append(token)
            if first_at is None:
                first_at = time.perf_counter()
        ended = time.perf_counter()
        firsts.append(first_at - started)
        speeds.append((len(tokens) - 1) / (ended - first_at) if len(tokens) > 1 else 0.0)
    return statistics.median(speeds), statistics.median(firsts), tokens


def time_generate(
    model: Any, prompt: list[int], new_tokens: int, repetitions: int
) -> tuple[float, float, list]:
    """Plain ``model.generate`` (the baseline) as its users call it, with no streamer or
    thread around it: time to first token from calls that generate one token, and tokens/s
    from calls that generate all of them, each timed as a whole: (n - 1) / (whole - first),
    the same decoding rate ``time_stream`` measures for the other rows. Medians."""
    first = generate_first_token_seconds(model, prompt, repetitions)
    wholes, tokens = [], []
    for _ in range(repetitions):
        seconds, tokens = _generate(model, prompt, new_tokens)
        wholes.append(seconds)
    whole = statistics.median(wholes)
    decoding = whole - first
    if decoding <= 0:  # a call too short to tell its first token from the rest (tiny models)
        decoding = whole
    return (new_tokens - 1) / decoding, first, tokens


def generate_first_token_seconds(model: Any, prompt: list[int], repetitions: int) -> float:
    """Median seconds of ``model.generate`` producing one token after ``prompt``."""
    return statistics.median(_generate(model, prompt, 1)[0] for _ in range(repetitions))


def _generate(model: Any, prompt: list[int], count: int) -> tuple[float, list[int]]:
    """Seconds ``model.generate`` takes to produce exactly ``count`` greedy tokens, and them."""
    started = time.perf_counter()
    output = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=count,
        min_new_tokens=count,
        do_sample=False,
        pad_token_id=0,
    )
    return time.perf_counter() - started, output[0, len(prompt) :].tolist()


class EngineStream:
    """Our decode engine (the one every front end uses) on ``model``, one request at a time,
    its loop run by the caller as in the CLI (``background=False``). No end-of-sequence ids:
    it always generates exactly ``new_tokens``, like the baseline."""

    def __init__(
        self, model: Any, prompt: list[int], new_tokens: int, prompt_lookup_tokens: int = 0
    ) -> None:
        self.engine = BatchingEngine(
            model,
            eos_token_ids=frozenset(),
            background=False,
            prompt_lookup_tokens=prompt_lookup_tokens,
        )
        self.prompt = prompt
        self.params = GenerationParams(
            do_sample=False, max_new_tokens=new_tokens, repetition_penalty=1.0
        )

    def __call__(self) -> Iterator[int]:
        return self.engine.generate_token_ids(self.prompt, self.params)

    def close(self) -> None:
        self.engine.close()


def time_engine(stream: EngineStream, repetitions: int) -> tuple[float, float, list]:
    """``time_stream`` on one of our engines, which is closed afterwards (its thread ends)."""
    try:
        return time_stream(stream, repetitions)
    finally:
        stream.close()


def engine_first_token_seconds(model: Any, prompt: list[int], repetitions: int) -> float:
    """Median seconds our engine takes to the first token after ``prompt``."""
    return time_engine(EngineStream(model, prompt, 1), repetitions)[1]


def prompt_lookup_row(
    model: Any, label: str, prompt: list[int], new_tokens: int, repetitions: int, drafts: int
) -> dict[str, Any]:
    """Our engine on one prompt without and with prompt-lookup drafts (PROMPT_LOOKUP_TOKENS
    ``drafts``), side by side: tokens/s of each, whether the tokens are the same, and how
    many tokens each forward pass gave on average."""
    plain_speed, _, plain_tokens = time_engine(EngineStream(model, prompt, new_tokens), repetitions)
    drafting = EngineStream(model, prompt, new_tokens, prompt_lookup_tokens=drafts)
    stats = drafting.engine.stats
    speed, _, tokens = time_engine(drafting, repetitions)
    return {
        "prompt": label,
        "prompt_lookup_tokens": drafts,
        "plain_tokens_per_second": plain_speed,
        "tokens_per_second": speed,
        "same_tokens": tokens == plain_tokens,
        # The prefill gives each reply its first token; every step after it one or more.
        "tokens_per_pass": (len(tokens) - 1) * repetitions / max(stats.steps, 1),
        "drafts_accepted": stats.accepted / stats.drafted if stats.drafted else 0.0,
    }


def long_prompt_for(
    tokenizer: Any, prompt_format: Any, length: int, request: str = "Summarise this conversation:"
) -> list[int]:
    """A chat prompt of about ``length`` tokens: ``request`` about real dialog (the bundled
    chitchat data), as a user pastes text in."""
    from src.chat.prompts import encode_conversation

    def prompt_with(text: str) -> list[int]:
        message = f"{request}\n\n{text}"
        return encode_conversation(
            tokenizer, prompt_format, None, [{"role": "user", "content": message}]
        )

    return prompt_with(dialog_text(tokenizer, length - len(prompt_with(""))))


def dialog_text(tokenizer: Any, length: int) -> str:
    """About ``length`` tokens of real dialog (the bundled chitchat data) as one text."""
    from src.training.data import load_examples

    dialog = "\n".join(
        message["content"] for example in load_examples("chitchat") for message in example.messages
    )
    return tokenizer.decode(tokenizer.encode(dialog, add_special_tokens=False)[:length])
