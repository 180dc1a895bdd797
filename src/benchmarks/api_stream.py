"""One stream at a time through the OpenAI chat API, as a user's client sees it: our server
and llama.cpp's (``python -m llama_cpp.server`` on the same GGUF file) side by side, with the
same requests: decoding tokens/s, time to the first token, and time to the first token after
a prompt of about 500 tokens.

Both servers render the same ChatML prompt (the system message is the one the GGUF file's
template adds when there is none, so neither adds its own) and decode greedily without a
repetition penalty (each server's own field for it: both default to 1.1), stopping where the
model ends its reply or at ``max_tokens``. Each round's requests start with their own text,
so neither server's cache of earlier prompts (our prefix cache, the keys and values
llama.cpp's server keeps of its previous prompt) covers more than the system message."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from src.benchmarks.serving import post_sse

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Between two requests: long enough for the last one's worker threads to stop spinning, so
# that one server's idle threads never share the cores with the other's request.
PAUSE_SECONDS = 0.5
TIMEOUT_SECONDS = 300  # for one request: a server that hangs fails its row
# Greedy decoding needs the repetition penalty off, which each server names its own way.
OUR_GREEDY = {"repetition_penalty": 1.0}
LLAMA_CPP_GREEDY = {"repeat_penalty": 1.0}


@dataclass(frozen=True)
class ApiServer:
    name: str
    url: str
    greedy: dict[str, Any]  # request fields, beyond temperature 0, for plain greedy decoding


class ServerFailed(Exception):
    """A request to one of the servers failed (an error status, a closed connection, no
    reply, a timeout): ``name`` says which."""

    def __init__(self, name: str, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.name = name


def chat(message: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": message}]


async def stream_chat(
    url: str, model: str, messages: list[dict], max_tokens: int, greedy: dict[str, Any]
) -> dict:
    """One streamed, greedy chat completion: seconds to its first text and in all, its
    completion tokens (the usage the server reports; a server that reports none, like
    llama.cpp's, sends a chunk per token) and prompt tokens where reported, and its text.
    Raises if the stream ends without ``[DONE]`` or without any text."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **greedy,
    }
    started = time.perf_counter()
    first, pieces, text, usage, done = None, 0, [], {}, False
    async for _, data in post_sse(url, "/v1/chat/completions", body):
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices", []):
            if content := choice.get("delta", {}).get("content"):
                first = first or time.perf_counter() - started
                pieces += 1
                text.append(content)
    if not done or first is None:
        raise RuntimeError("the stream ended early" if not done else "the reply had no text")
    return {
        "first": first,
        "total": time.perf_counter() - started,
        "tokens": usage.get("completion_tokens", pieces),
        "prompt_tokens": usage.get("prompt_tokens"),
        "text": "".join(text),
    }


def served_model(url: str) -> str:
    """The id of the (first) model the server lists at /v1/models."""
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


def measure_api_streams(
    servers: list[ApiServer], long_text: str, new_tokens: int, repetitions: int, progress=print
) -> list[dict[str, Any]]:
    """For each server, medians over ``repetitions`` of: decoding tokens/s after the first
    token of a story of up to ``new_tokens``, the seconds to that first token, and the
    seconds to the first token after a request to summarise ``long_text``. The servers take
    turns, request by request, so a slow spell of the machine falls on both. Raises
    ``ServerFailed`` naming the server whose request failed."""
    models = {
        server.name: request(server, lambda s=server: served_model(s.url)) for server in servers
    }

    def chat_once(server: ApiServer, message: str, max_tokens: int) -> dict:
        time.sleep(PAUSE_SECONDS)
        model = models[server.name]
        reply = stream_chat(server.url, model, chat(message), max_tokens, server.greedy)
        return request(server, lambda: asyncio.run(asyncio.wait_for(reply, TIMEOUT_SECONDS)))

    for server in servers:  # warm-up, untimed: a server's first request pays more
        chat_once(server, "Hello!", 4)
    runs: dict[str, list[dict]] = {server.name: [] for server in servers}
    for repetition in range(repetitions):
        progress(f"  serving: one stream through the OpenAI API, round {repetition + 1}")
        for server in servers:
            story = chat_once(server, f"Story {repetition}: tell me a long story.", new_tokens)
            long = chat_once(server, f"Text {repetition}: summarise it.\n\n{long_text}", 1)
            runs[server.name].append({"story": story, "long": long})
    return [summary(name, results) for name, results in runs.items()]


def request(server: ApiServer, send: Callable[[], Any]) -> Any:
    """``send()``, its failure raised as ``ServerFailed`` naming ``server``."""
    try:
        return send()
    except Exception as exc:
        raise ServerFailed(server.name, exc) from exc


def summary(name: str, results: list[dict]) -> dict[str, Any]:
    def speed(story: dict) -> float:
        decoding = story["total"] - story["first"]
        return (story["tokens"] - 1) / decoding if story["tokens"] > 1 and decoding > 0 else 0.0

    stories = [r["story"] for r in results]
    return {
        "name": name,
        "tokens_per_second": statistics.median(speed(story) for story in stories),
        "first_token_seconds": statistics.median(story["first"] for story in stories),
        "long_prompt_first_token_seconds": statistics.median(r["long"]["first"] for r in results),
        "long_prompt_tokens": results[-1]["long"]["prompt_tokens"],
        "tokens": stories[-1]["tokens"],
        "text": stories[-1]["text"],
    }
