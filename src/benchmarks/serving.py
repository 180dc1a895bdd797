"""The API under concurrent streaming clients: aggregate tokens/s, time to first token and
total latency (p50, p95), with 1, 4, 8 and 16 clients at once."""

from __future__ import annotations

import json
import statistics
import threading
import time

import httpx

from src.benchmarks.load import sse_events

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rain forms.",
    "Describe your ideal weekend.",
    "Tell me about the history of bicycles.",
    "What makes a good friend?",
    "Describe a walk in a forest in autumn.",
    "Explain why the sea is salty.",
    "Write a letter to a pen pal.",
]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def stream_one(url: str, prompt: str, new_tokens: int) -> dict:
    started = time.perf_counter()
    first = None
    body = {"message": prompt, "max_new_tokens": new_tokens, "do_sample": False}
    with httpx.stream("POST", f"{url}/chat/stream", json=body, timeout=600) as response:
        for event, data in sse_events(response):
            if event == "delta" and first is None:
                first = time.perf_counter() - started
            if event == "done":
                tokens = json.loads(data)["usage"]["completion_tokens"]
    return {"first": first or 0.0, "total": time.perf_counter() - started, "tokens": tokens}


def measure_concurrency(url: str, clients: int, new_tokens: int, repetitions: int = 1) -> dict:
    """``clients`` streams started at once, ``repetitions`` times; medians of each figure."""
    rounds = [measure_round(url, clients, new_tokens) for _ in range(repetitions)]
    return {"clients": clients} | {
        name: statistics.median(r[name] for r in rounds) for name in rounds[0]
    }


def measure_round(url: str, clients: int, new_tokens: int) -> dict:
    results: list[dict] = [None] * clients
    threads = [
        threading.Thread(
            target=lambda i=i: results.__setitem__(
                i, stream_one(url, PROMPTS[i % len(PROMPTS)] + f" (#{i})", new_tokens)
            )
        )
        for i in range(clients)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    firsts = [r["first"] for r in results]
    totals = [r["total"] for r in results]
    return {
        "aggregate_tokens_per_second": sum(r["tokens"] for r in results) / wall,
        "first_token_p50": statistics.median(firsts),
        "first_token_p95": percentile(firsts, 0.95),
        "latency_p50": statistics.median(totals),
        "latency_p95": percentile(totals, 0.95),
    }
