"""Constrained decoding against free decoding: the same prompt, the same engine and model, in
one process. A JSON-schema reply masks every token its grammar forbids at every step; this
measures what that costs per token (and the mask's own cost, timed apart)."""

from __future__ import annotations

import statistics
import time
from typing import Any

from src.chat.service import ChatService
from src.params import GenerationParams

PROMPT = "List ten fruits and their colours as JSON."
SCHEMA = {
    "type": "object",
    "properties": {
        "fruits": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 30},
                    "colour": {"type": "string", "maxLength": 30},
                },
                "required": ["name", "colour"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["fruits"],
    "additionalProperties": False,
}


def timed_reply(service: ChatService, params: GenerationParams) -> tuple[float, int]:
    """(tokens/s after the first token, tokens) of one reply."""
    stream = service.start_reply(service.new_conversation(), PROMPT, params)
    first_at = None
    for _ in stream.deltas():
        if first_at is None:
            first_at = time.perf_counter()
    ended = time.perf_counter()
    tokens = stream.result.completion_tokens
    return (tokens - 1) / (ended - first_at) if tokens > 1 and first_at else 0.0, tokens


def mask_microseconds(service: ChatService, tokens: list[int]) -> float:
    """Mean time to compute one step's mask along a reply's tokens."""
    import torch

    from src.chat.structured import response_format_grammar
    from src.params import ResponseFormat

    backend = service.backend
    grammar = response_format_grammar(ResponseFormat(type="json_schema", json_schema=SCHEMA))
    constraint = backend.grammars.constraint(grammar)
    bitmask = torch.zeros((backend.vocab_size + 31) // 32, dtype=torch.int32)
    spent = 0.0
    for token in tokens:
        started = time.perf_counter()
        constraint.fill_mask(bitmask)
        spent += time.perf_counter() - started
        constraint.advance(token)
    return spent / max(len(tokens), 1) * 1e6


def measure_structured(service: ChatService, new_tokens: int, repetitions: int) -> dict[str, Any]:
    free = GenerationParams(do_sample=False, max_new_tokens=new_tokens, repetition_penalty=1.0)
    constrained = free.updated(
        response_format={"type": "json_schema", "json_schema": SCHEMA, "name": "fruits"}
    )
    service.cache.max_entries = 0  # every repetition generates
    kinds = (("free text", free), ("JSON schema (grammar mask)", constrained))
    # Interleaved (free, constrained, free, ...): a slow spell of the machine hits both alike.
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name, _ in kinds}
    for _ in range(repetitions):
        for name, params in kinds:
            runs[name].append(timed_reply(service, params))
    rows = [
        {
            "name": name,
            "tokens_per_second": statistics.median(speed for speed, _ in runs[name]),
            "tokens": runs[name][-1][1],
        }
        for name, _ in kinds
    ]
    stream = service.start_reply(service.new_conversation(), PROMPT, constrained)
    stream.complete()
    reply_ids = service.tokenize(stream.result.text, add_special_tokens=False)
    return {
        "new_tokens": new_tokens,
        "repetitions": repetitions,
        "rows": rows,
        "mask_microseconds_per_token": mask_microseconds(service, reply_ids),
    }
