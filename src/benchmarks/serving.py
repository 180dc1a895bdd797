"""The API under concurrent streaming clients: aggregate tokens/s, time to first token and
total latency (p50, p95), with 1, 4, 8 and 16 clients at once."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx

from src.benchmarks.load import async_sse_events

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


async def stream_one(http: httpx.AsyncClient, prompt: str, new_tokens: int) -> dict:
    started = time.perf_counter()
    first = None
    body = {"message": prompt, "max_new_tokens": new_tokens, "do_sample": False}
    async with http.stream("POST", "/chat/stream", json=body) as response:
        async for event, data in async_sse_events(response):
            if event == "delta" and first is None:
                first = time.perf_counter() - started
            if event == "done":
                tokens = json.loads(data)["usage"]["completion_tokens"]
    return {"first": first or 0.0, "total": time.perf_counter() - started, "tokens": tokens}


def measure_concurrency(url: str, clients: int, new_tokens: int, repetitions: int = 1) -> dict:
    """``clients`` streams started at once, ``repetitions`` times; medians of each figure."""
    rounds = [asyncio.run(measure_round(url, clients, new_tokens)) for _ in range(repetitions)]
    return {"clients": clients} | {
        name: statistics.median(r[name] for r in rounds) for name in rounds[0]
    }


async def measure_round(url: str, clients: int, new_tokens: int) -> dict:
    """All the clients in one thread, as asyncio tasks: the load generator shares the
    server's cores, so it must cost little. (A thread per client with a blocking client cost
    0.6 ms of CPU per token received, 2.5 times this; ``client_cpu_ms_per_token`` reports
    what it took.)"""
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        cpu_started, started = time.process_time(), time.perf_counter()
        results = await asyncio.gather(
            *(
                stream_one(http, PROMPTS[i % len(PROMPTS)] + f" (#{i})", new_tokens)
                for i in range(clients)
            )
        )
        wall = time.perf_counter() - started
        client_cpu = time.process_time() - cpu_started
    firsts = [r["first"] for r in results]
    totals = [r["total"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {
        "aggregate_tokens_per_second": tokens / wall,
        "first_token_p50": statistics.median(firsts),
        "first_token_p95": percentile(firsts, 0.95),
        "latency_p50": statistics.median(totals),
        "latency_p95": percentile(totals, 0.95),
        "client_cpu_ms_per_token": 1000 * client_cpu / max(tokens, 1),
    }
