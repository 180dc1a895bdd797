"""One stream at a time through the OpenAI chat API, as a user's client sees it: our server
and llama.cpp's (``python -m llama_cpp.server`` on the same GGUF file) side by side, with the
same requests: decoding tokens/s, time to the first token, and time to the first token after
a prompt of about 500 tokens.

Both servers render the same ChatML prompt (the system message is the one the GGUF file's
template adds when there is none, so neither adds its own), decode greedily and stop where the
model ends its reply or at ``max_tokens``. Each keeps what it does between requests as its
users get it: ours its prefix cache, llama.cpp's server the keys and values of the previous
prompt, so the repeated short prompt is partly cached on both; each long prompt starts with
its own text, so neither can reuse more than the system message."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

import httpx

from src.benchmarks.serving import post_sse

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
STORY_REQUEST = "Tell me a long story."
# Between two requests: long enough for the last one's worker threads to stop spinning, so
# that one server's idle threads never share the cores with the other's request.
PAUSE_SECONDS = 0.5


def chat(message: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": message}]


async def stream_chat(url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed, greedy chat completion: seconds to its first text and in all, its
    completion tokens (the usage the server reports; a server that reports none, like
    llama.cpp's, sends a chunk per token) and prompt tokens where reported, and its text."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first, pieces, text, usage = None, 0, [], {}
    async for _, data in post_sse(url, "/v1/chat/completions", body):
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices", []):
            if content := choice.get("delta", {}).get("content"):
                first = first or time.perf_counter() - started
                pieces += 1
                text.append(content)
    return {
        "first": first or 0.0,
        "total": time.perf_counter() - started,
        "tokens": usage.get("completion_tokens", pieces),
        "prompt_tokens": usage.get("prompt_tokens"),
        "text": "".join(text),
    }


def served_model(url: str) -> str:
    """The id of the (first) model the server lists at /v1/models."""
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


def measure_api_streams(
    servers: dict[str, str], long_text: str, new_tokens: int, repetitions: int, progress=print
) -> list[dict[str, Any]]:
    """For each server (name -> URL), medians over ``repetitions`` of: decoding tokens/s
    after the first token of a story of up to ``new_tokens``, the seconds to that first token,
    and the seconds to the first token after a request to summarise ``long_text``. The
    servers take turns, request by request, so a slow spell of the machine falls on both."""
    models = {name: served_model(url) for name, url in servers.items()}
    for name, url in servers.items():  # warm-up, untimed: a server's first request pays more
        asyncio.run(stream_chat(url, models[name], chat("Hello!"), 4))
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    for repetition in range(repetitions):
        progress(f"  serving: one stream through the OpenAI API, round {repetition + 1}")
        long_request = chat(f"Text {repetition}: summarise it.\n\n{long_text}")
        for name, url in servers.items():
            time.sleep(PAUSE_SECONDS)
            story = asyncio.run(stream_chat(url, models[name], chat(STORY_REQUEST), new_tokens))
            time.sleep(PAUSE_SECONDS)
            long = asyncio.run(stream_chat(url, models[name], long_request, 1))
            runs[name].append({"story": story, "long": long})
    return [summary(name, results) for name, results in runs.items()]


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
