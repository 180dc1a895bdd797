"""The API under concurrent streaming clients: aggregate tokens/s, time to first token and
total latency (p50, p95), with 1, 4, 8 and 16 clients at once; and a mixed load, short chats
arriving one after another while a long prompt comes in among them."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx

from src.benchmarks.load import SSEReader

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


async def stream_one(url: str, prompt: str, new_tokens: int) -> dict:
    """One streamed reply: seconds to its first text, in all, and the longest pause between
    two pieces of text (how long the reply stood still), and its token count."""
    started = time.perf_counter()
    first = last = None
    longest_pause = 0.0
    tokens = 0
    body = {"message": prompt, "max_new_tokens": new_tokens, "do_sample": False}
    async for event, data in post_sse(url, "/chat/stream", body):
        if event == "delta":
            now = time.perf_counter()
            if first is None:
                first = now - started
            else:
                longest_pause = max(longest_pause, now - last)
            last = now
        if event == "done":
            tokens = json.loads(data)["usage"]["completion_tokens"]
    total = time.perf_counter() - started
    return {"first": first or 0.0, "total": total, "pause": longest_pause, "tokens": tokens}


async def post_sse(url: str, path: str, body: dict):
    """(event, data) pairs of one streamed POST, read straight off an asyncio connection.

    The load generator runs on the server's own two cores, so every microsecond it spends
    per token is taken from the model: this HTTP/1.1 client (a request, a status line,
    headers, a chunked body) costs a fraction of a general-purpose client's per-token work
    (``client_cpu_ms_per_token`` in the results shows what it took)."""
    address = httpx.URL(url)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    try:
        payload = json.dumps(body).encode()
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {address.host}:{address.port}\r\n"
            "Content-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        status = (await reader.readline()).decode("latin-1")
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        if " 200 " not in status or "transfer-encoding: chunked" not in head:
            raise RuntimeError(f"POST {path}: {status.strip()} {await reader.read(300)!r}")
        sse = SSEReader()
        pending = b""
        while size := int(await chunk_size_line(reader), 16):
            pending += (await reader.readexactly(size + 2))[:-2]
            *lines, pending = pending.split(b"\n")  # the last piece may be an unfinished line
            for line in lines:  # (server-sent events may end their lines with \r\n)
                if (event := sse.read(line.decode().removesuffix("\r"))) is not None:
                    yield event
    finally:
        writer.close()


async def chunk_size_line(reader: asyncio.StreamReader) -> bytes:
    """The size line of the next chunk of a chunked body; a server that closes the connection
    before the last (empty) chunk has ended the stream early."""
    line = await reader.readline()
    if not line:
        raise ConnectionError("the server closed the connection mid-stream")
    return line.strip() or b"0"


def measure_concurrency(
    url: str, client_counts: list[int], new_tokens: int, repetitions: int = 1, progress=print
) -> list[dict]:
    """For each count of clients, that many streams started at once; medians over
    ``repetitions`` rounds. The rounds take turns (1, 4, 8, 16 clients, then again), so a
    slow spell of this shared machine falls on every count alike instead of on one of them:
    the ratios against one client compare rounds run side by side."""
    rounds: dict[int, list[dict]] = {count: [] for count in client_counts}
    for repetition in range(repetitions):
        for count in client_counts:
            progress(f"  serving: {count} clients, round {repetition + 1}/{repetitions}")
            rounds[count].append(asyncio.run(measure_round(url, count, new_tokens)))
    return [
        {"clients": count}
        | {name: statistics.median(r[name] for r in results) for name in results[0]}
        for count, results in rounds.items()
    ]


async def measure_round(url: str, clients: int, new_tokens: int) -> dict:
    """All the clients in one thread, as asyncio tasks on raw connections (``post_sse``): the
    load generator shares the server's cores, so it must cost little. (A thread per client
    with a blocking httpx client cost 0.6 ms of CPU per token received, httpx's async client
    0.2-0.5 ms; ``client_cpu_ms_per_token`` reports what this one took.)"""
    cpu_started, started = time.process_time(), time.perf_counter()
    results = await asyncio.gather(
        *(
            stream_one(url, PROMPTS[i % len(PROMPTS)] + f" (#{i})", new_tokens)
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


async def measure_mixed_load(
    url: str, long_message: str, clients: int = 12, every: float = 0.25, new_tokens: int = 64
) -> dict:
    """``clients`` short chats, one every ``every`` seconds (with the long one, at most 16
    streams at once: the server's limit per client address), and ``long_message`` (a pasted
    text of about a thousand tokens) arriving after the fourth: time to first token of the
    short chats (p50, p95), the longest pause of a short reply once it has started (p50,
    max: how long the long prompt froze them), and the long prompt's own first token."""

    async def short(index: int) -> dict:
        await asyncio.sleep(index * every)
        return await stream_one(url, PROMPTS[index % len(PROMPTS)] + f" (#{index})", new_tokens)

    async def long() -> dict:
        await asyncio.sleep(3.5 * every)
        return await stream_one(url, long_message, new_tokens)

    started = time.perf_counter()
    *shorts, pasted = await asyncio.gather(*(short(i) for i in range(clients)), long())
    wall = time.perf_counter() - started
    firsts = [r["first"] for r in shorts]
    pauses = [r["pause"] for r in shorts]
    return {
        "clients": clients,
        "aggregate_tokens_per_second": sum(r["tokens"] for r in (*shorts, pasted)) / wall,
        "first_token_p50": statistics.median(firsts),
        "first_token_p95": percentile(firsts, 0.95),
        "longest_pause_p50": statistics.median(pauses),
        "longest_pause_max": max(pauses),
        "long_prompt_first_token": pasted["first"],
    }
