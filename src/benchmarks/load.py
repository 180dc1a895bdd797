"""A load test of the API (loopback only, bounded in count and time).

Many concurrent clients, each a thread with its own HTTP connection, loop over a mix of
requests: ``POST /chat`` (starting and continuing sessions), ``POST /chat/stream`` (SSE),
``POST /v1/chat/completions`` plain and streamed (JSON mode, tools), legacy completions,
tokenize, Anthropic's ``/v1/messages``, Ollama's ``/api/chat``, judgements of the session's
last reply (``load_routes.py``) and, with adapters, chat through them. A fraction of the
streamed requests disconnect after their first piece of text, as a browser tab closed
mid-reply does. The run
reports what was served, every error by kind (any 5xx, 429 and other unexpected 4xx,
connection errors and timeouts, streams that end without their last event or carry an
``error`` event, replies of the wrong shape), latency percentiles, the server's resident
memory before (after a warm-up), right after and a while after the run, and finally checks
every session it kept: each holds exactly the exchanges its client saw completed, with the
edits and chosen candidates it made (nothing from a client that disconnected, no half
exchange).

    python scripts/load_test.py --clients 16 --requests 40          # or: make load-test
    tests/integration/test_load.py runs a short version in the test suite.
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from src.benchmarks.load_routes import OtherRoutes
from src.benchmarks.processes import ServerSupervisor, rss_mb
from src.config import Settings

# Growth of the server's resident memory allowed after the warm-up: what the allocator keeps
# for the largest batches (tens of MB, see docs/RELIABILITY.md), with a margin, plus the
# prefix cache, which keeps up to PREFIX_CACHE_MB of keys and values on purpose.
ALLOWED_GROWTH_MB = 150 + Settings.model_fields["prefix_cache_mb"].default

PROMPTS = [
    "What is the capital of France?",
    "Tell me a joke about computers.",
    "How do plants make food?",
    "Give me one tip for learning to cook.",
    "What is your favourite season, and why?",
    "Name three animals that live in the sea.",
    "Explain what a rainbow is.",
    "Say hello in three languages.",
]

# The request mix: each kind's share of the requests that do not disconnect (``adapter_chat``
# only when the run names adapters).
RETRY_PAUSE_SECONDS = 0.5  # after a refused connection

KINDS = (
    "chat",
    "chat_stream",
    "openai",
    "openai_stream",
    "openai_json",
    "openai_tools",
    "completions",
    "tokenize",
    "anthropic",
    "ollama",
    "feedback",
    "adapter_chat",
)
DISCONNECTING = ("chat_stream_disconnect", "openai_stream_disconnect")
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@dataclass
class LoadConfig:
    clients: int = 8
    requests: int | None = 40  # per client (None: until ``duration`` runs out)
    duration: float | None = None  # seconds after which no client starts a new request
    disconnect_fraction: float = 0.1  # share of requests that hang up after the first text
    max_new_tokens: int = 12
    turns_per_session: int = 4  # a client starts a new session after this many exchanges
    warmup_requests: int = 2  # per client, before the "before" memory figure
    settle_seconds: float = 5.0  # wait after the run before the last memory figure
    timeout: float = 120.0  # seconds for one request
    seed: int = 0
    api_key: str | None = None
    rounds: int = 1  # run the load this many times, with the memory measured after each
    adapters: list[str] = field(default_factory=list)  # names in the server's ADAPTERS_DIR
    sample_seconds: float = 10.0  # how often the server's memory is read during the load


@dataclass
class Outcome:
    kind: str
    # "served", "disconnected", "refused" (503 server_busy: the server said to come back),
    # "interrupted" (an error while the server was being stopped or restarted on purpose),
    # or "error"
    status: str
    seconds: float
    first_text_seconds: float | None = None
    error: str | None = None  # the kind of error, e.g. "http_500", "connection"
    detail: str | None = None  # what happened, for the report
    started_at: float = 0.0  # time.monotonic() at the start
    error_type: str | None = None  # the API's error type, e.g. "server_shutdown"


@dataclass
class SessionRecord:
    session_id: str
    messages: list[dict] = field(default_factory=list)  # the exchanges it saw completed
    # A message whose request failed: its exchange may have been saved whole just before (a
    # server killed after the commit), never in part. The client leaves the session after it.
    unanswered: str | None = None

    @property
    def completed(self) -> int:
        return len(self.messages) // 2


@dataclass
class ClientState:
    number: int
    rng: random.Random
    session: SessionRecord | None = None
    sessions: list[SessionRecord] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)


class RequestFailed(Exception):
    def __init__(self, kind: str, detail: str, error_type: str | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.error_type = error_type  # the API's error type, e.g. "server_busy"


def percentile(values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def check_status(response: httpx.Response) -> None:
    if response.status_code in (200, 201):
        return
    try:
        response.read()
        body = response.json()
    except Exception:
        body = None
    message, error_type = error_message_and_type(response, body)
    raise RequestFailed(f"http_{response.status_code}", message, error_type)


def error_message_and_type(response: httpx.Response, body: Any) -> tuple[str, str | None]:
    """The message of an error in any of the protocols' shapes, and the server's own error
    type. OpenAI's shape carries that type; Anthropic's names only the protocol's kind
    (``overloaded_error`` for every 503) and Ollama's none, so for those a 503 is told apart
    by what a client sees: Retry-After (busy), or its message (loading, shutting down)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        message = error["message"]
        if body.get("type") != "error":  # OpenAI's shape (Anthropic's says "type": "error")
            return message, error.get("type")
    elif isinstance(error, str):
        message = error
    else:
        return (response.text[:200] if response.is_stream_consumed else ""), None
    if response.status_code != 503:
        return message, None
    if "Retry-After" in response.headers:
        return message, "server_busy"
    if "still loading" in message:
        return message, "service_unavailable"
    if "shutting down" in message or "engine was closed" in message:
        return message, "server_shutdown"
    return message, None


class SSEReader:
    """Lines of a server-sent event stream in, complete (event, data) pairs out."""

    def __init__(self) -> None:
        self.event: str | None = None
        self.data: list[str] = []

    def read(self, line: str) -> tuple[str | None, str] | None:
        """The event this line completes (a blank line ends one), or None."""
        if line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].strip())
        elif line == "" and self.data:
            complete = (self.event, "\n".join(self.data))
            self.event, self.data = None, []
            return complete
        return None


def sse_events(response: httpx.Response):
    """(event, data) pairs of a server-sent event stream, as they arrive."""
    reader = SSEReader()
    for line in response.iter_lines():
        if (event := reader.read(line)) is not None:
            yield event


class LoadClient(OtherRoutes):
    """One simulated user: a connection of its own and, at times, a session."""

    def __init__(self, url: str, config: LoadConfig, state: ClientState) -> None:
        self.config = config
        self.state = state
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.http = httpx.Client(base_url=url, timeout=config.timeout, headers=headers)
        self.sent_to_session: str | None = None  # the message of a request to the session

    def close(self) -> None:
        self.http.close()

    def prompt(self) -> str:
        rng = self.state.rng
        return f"{rng.choice(PROMPTS)} (client {self.state.number}, #{rng.randrange(10**6)})"

    def pick(self) -> str:
        rng = self.state.rng
        if rng.random() < self.config.disconnect_fraction:
            return rng.choice(DISCONNECTING)
        kinds = [k for k in KINDS if k != "adapter_chat" or self.config.adapters]
        return rng.choice(kinds)

    def run_one(self, kind: str) -> Outcome:
        started, at = time.perf_counter(), time.monotonic()
        first: list[float] = []
        self.sent_to_session = None  # set by a request to the client's session
        try:
            status = getattr(self, kind)(started, first)
        except RequestFailed as exc:
            self.leave_session_after_a_failure()
            status = "refused" if exc.error_type == "server_busy" else "error"
            seconds = time.perf_counter() - started
            outcome = Outcome(kind, status, seconds, None, exc.kind, exc.detail, at)
            outcome.error_type = exc.error_type
            return outcome
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            self.leave_session_after_a_failure()
            kind_of_error = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection"
            seconds = time.perf_counter() - started
            detail = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, httpx.ConnectError):
                # Nothing listens (a restart): wait before the next try, as a client with
                # retries does, instead of counting thousands of refused connections.
                time.sleep(RETRY_PAUSE_SECONDS)
            return Outcome(kind, "error", seconds, None, kind_of_error, detail, at)
        seconds = time.perf_counter() - started
        return Outcome(kind, status, seconds, first[0] if first else None, started_at=at)

    def leave_session_after_a_failure(self) -> None:
        """The last request to the session failed: its exchange may or may not be stored
        (whole), so the session is checked with that in mind and the client starts another."""
        session = self.state.session
        if session is not None and self.sent_to_session is not None:
            session.unanswered = self.sent_to_session
            self.state.session = None
        self.sent_to_session = None

    # ---- the native routes -----------------------------------------------------------------

    def native_body(self, with_session: bool) -> dict:
        body = {"message": self.prompt(), "max_new_tokens": self.config.max_new_tokens}
        self.sent_to_session = None
        if with_session and self.state.session is not None:
            body["session_id"] = self.state.session.session_id
            self.sent_to_session = body["message"]
        return body

    def check_reply(self, reply: dict, body: dict) -> None:
        text, usage = reply.get("response"), reply.get("usage") or {}
        if not isinstance(text, str) or not isinstance(reply.get("session_id"), str):
            raise RequestFailed("bad_response", f"not a chat reply: {str(reply)[:200]}")
        if reply.get("finish_reason") not in ("stop", "length"):
            raise RequestFailed("bad_response", f"finish_reason {reply.get('finish_reason')!r}")
        if not 0 <= usage.get("completion_tokens", -1) <= self.config.max_new_tokens:
            raise RequestFailed("bad_response", f"usage {usage}")
        if "session_id" in body and reply["session_id"] != body["session_id"]:
            raise RequestFailed("bad_response", "the reply names another session")

    def completed_exchange(self, session_id: str, message: str, reply: str) -> None:
        """The client saw an exchange of its session completed."""
        state = self.state
        if state.session is None or state.session.session_id != session_id:
            state.session = SessionRecord(session_id)
            state.sessions.append(state.session)
        state.session.messages += [
            {"role": "user", "content": message},
            {"role": "assistant", "content": reply},
        ]
        if state.session.completed >= self.config.turns_per_session:
            state.session = None  # the next exchange starts a new session

    def chat(self, started: float, first: list[float], adapter: str | None = None) -> str:
        body = self.native_body(with_session=True)
        if adapter is not None:
            body["adapter"] = adapter
        response = self.http.post("/chat", json=body)
        check_status(response)
        reply = response.json()
        self.check_reply(reply, body)
        self.completed_exchange(reply["session_id"], body["message"], reply["response"])
        return "served"

    def chat_stream(self, started: float, first: list[float], disconnect: bool = False) -> str:
        body = self.native_body(with_session=not disconnect)
        with self.http.stream("POST", "/chat/stream", json=body) as response:
            check_status(response)
            text = []
            for event, data in sse_events(response):
                if event == "delta":
                    if not first:
                        first.append(time.perf_counter() - started)
                    text.append(json.loads(data)["text"])
                    if disconnect:
                        return "disconnected"  # leaving the block closes the connection
                elif event == "done":
                    reply = json.loads(data)
                    self.check_reply(reply, body)
                    if reply["response"] != "".join(text):
                        raise RequestFailed("bad_response", "the deltas do not add up")
                    if not disconnect:
                        self.completed_exchange(
                            reply["session_id"], body["message"], reply["response"]
                        )
                    return "served"
                elif event == "error":
                    raise RequestFailed("stream_error", data[:300], stream_error_type(data))
        raise RequestFailed("stream_incomplete", "the stream ended without its 'done' event")

    def adapter_chat(self, started: float, first: list[float]) -> str:
        """/chat in the client's session through one of the run's LoRA adapters: adapters load
        on first use, and the least recently used idle one is closed when MAX_LOADED_ADAPTERS
        are loaded (a 503 server_busy when all are busy is a refusal, not an error)."""
        return self.chat(started, first, adapter=self.state.rng.choice(self.config.adapters))

    def chat_stream_disconnect(self, started: float, first: list[float]) -> str:
        # Never the client's own session: a reply finished just before the hang-up is saved,
        # so only sessions that nobody counts may receive one.
        return self.chat_stream(started, first, disconnect=True)

    # ---- the OpenAI route ------------------------------------------------------------------

    def openai_body(self, stream: bool) -> dict:
        messages = [{"role": "user", "content": self.prompt()}]
        if self.state.rng.random() < 0.5:  # some requests carry earlier turns
            messages = [
                {"role": "system", "content": "You are brief."},
                {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                *messages,
            ]
        body = {"model": "any", "messages": messages, "max_tokens": self.config.max_new_tokens}
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def openai(self, started: float, first: list[float]) -> str:
        response = self.http.post("/v1/chat/completions", json=self.openai_body(stream=False))
        check_status(response)
        reply = response.json()
        try:
            choice = reply["choices"][0]
            ok = isinstance(choice["message"]["content"], str) and choice["finish_reason"] in (
                "stop",
                "length",
            )
            ok = ok and reply["usage"]["completion_tokens"] <= self.config.max_new_tokens
        except (KeyError, IndexError, TypeError):
            ok = False
        if not ok:
            raise RequestFailed("bad_response", f"not a chat completion: {str(reply)[:200]}")
        return "served"

    def openai_stream(self, started: float, first: list[float], disconnect: bool = False) -> str:
        with self.http.stream(
            "POST", "/v1/chat/completions", json=self.openai_body(stream=True)
        ) as response:
            check_status(response)
            finished = False
            for _event, data in sse_events(response):
                if data == "[DONE]":
                    if not finished:
                        raise RequestFailed("stream_incomplete", "[DONE] before finish_reason")
                    return "served"
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RequestFailed("stream_error", data[:300], stream_error_type(data))
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        if not first:
                            first.append(time.perf_counter() - started)
                        if disconnect:
                            return "disconnected"
                    finished = finished or choice.get("finish_reason") is not None
        raise RequestFailed("stream_incomplete", "the stream ended without [DONE]")

    def openai_stream_disconnect(self, started: float, first: list[float]) -> str:
        return self.openai_stream(started, first, disconnect=True)

    def post_json(self, route: str, body: dict) -> dict:
        response = self.http.post(route, json=body)
        check_status(response)
        return response.json()

    check = staticmethod(check_status)

    @staticmethod
    def failed(detail: str) -> RequestFailed:
        return RequestFailed("bad_response", detail)

    def openai_json(self, started: float, first: list[float]) -> str:
        """JSON mode: a reply that ends on its own is a JSON object (the grammar's promise)."""
        body = self.openai_body(stream=False)
        body["response_format"] = {"type": "json_object"}
        body["max_tokens"] = max(body["max_tokens"], 48)
        choice = self.post_json("/v1/chat/completions", body)["choices"][0]
        if choice["finish_reason"] == "stop":
            try:
                if not isinstance(json.loads(choice["message"]["content"]), dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                raise RequestFailed("bad_response", f"JSON mode gave {exc}") from None
        return "served"

    def openai_tools(self, started: float, first: list[float]) -> str:
        """A required tool call: its arguments are valid JSON with the required field."""
        body = self.openai_body(stream=False)
        body.update(tools=[WEATHER_TOOL], tool_choice="required", max_tokens=64)
        choice = self.post_json("/v1/chat/completions", body)["choices"][0]
        if choice["finish_reason"] == "tool_calls":
            call = choice["message"]["tool_calls"][0]["function"]
            try:
                arguments = json.loads(call["arguments"])
                valid = call["name"] == "get_weather" and isinstance(arguments["city"], str)
            except (ValueError, KeyError, TypeError):
                valid = False
            if not valid:
                raise RequestFailed("bad_response", f"tool call {call}")
        elif choice["finish_reason"] != "length":
            raise RequestFailed("bad_response", f"finish_reason {choice['finish_reason']!r}")
        return "served"

    def completions(self, started: float, first: list[float]) -> str:
        body = {"prompt": self.prompt(), "max_tokens": self.config.max_new_tokens, "logprobs": 2}
        reply = self.post_json("/v1/completions", body)
        choice = reply["choices"][0]
        if not isinstance(choice["text"], str) or choice["finish_reason"] not in ("stop", "length"):
            raise RequestFailed("bad_response", f"not a completion: {str(reply)[:200]}")
        return "served"

    def tokenize(self, started: float, first: list[float]) -> str:
        text = self.prompt()
        tokens = self.post_json("/tokenize", {"prompt": text, "add_special_tokens": False})
        back = self.post_json("/detokenize", {"tokens": tokens["tokens"]})
        if back["prompt"] != text:
            raise RequestFailed("bad_response", f"{text!r} came back as {back['prompt']!r}")
        return "served"


def drive(url: str, config: LoadConfig, states: list[ClientState], requests: int | None) -> float:
    """Every client runs ``requests`` requests (or until ``config.duration``); returns the
    wall time."""
    deadline = None if config.duration is None else time.monotonic() + config.duration

    def work(state: ClientState) -> None:
        client = LoadClient(url, config, state)
        try:
            done = 0
            while requests is None or done < requests:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                outcome = client.run_one(client.pick())
                state.outcomes.append(outcome)
                done += 1
                if outcome.error == "connection":
                    time.sleep(0.5)  # the server is down (a restart in a soak): do not spin
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(state,), daemon=True) for state in states]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def check_sessions(url: str, config: LoadConfig, states: list[ClientState]) -> list[Outcome]:
    """Each session a client kept must hold exactly the exchanges the client saw completed,
    word for word."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    problems = []
    with httpx.Client(base_url=url, timeout=config.timeout, headers=headers) as http:
        for state in states:
            for record in state.sessions:
                response = http.get(f"/sessions/{record.session_id}")
                if response.status_code != 200:
                    detail = f"session {record.session_id}: HTTP {response.status_code}"
                    problems.append(Outcome("session", "error", 0.0, None, "session", detail))
                    continue
                messages = response.json()["messages"]
                saved_whole = (
                    record.unanswered is not None
                    and len(messages) == len(record.messages) + 2
                    and messages[:-2] == record.messages
                    and messages[-2] == {"role": "user", "content": record.unanswered}
                )
                if messages != record.messages and not saved_whole:
                    detail = (
                        f"session {record.session_id}: {len(messages)} messages stored, not "
                        f"the {len(record.messages)} its client saw completed"
                    )
                    problems.append(Outcome("session", "error", 0.0, None, "session", detail))
    return problems


def summarise(outcomes: list[Outcome], wall: float) -> dict:
    def stats(group: list[Outcome]) -> dict:
        served = [o for o in group if o.status == "served"]
        latencies = [o.seconds for o in served]
        firsts = [o.first_text_seconds for o in served if o.first_text_seconds is not None]
        return {
            "requests": len(group),
            "served": len(served),
            "disconnected": sum(o.status == "disconnected" for o in group),
            "refused": sum(o.status == "refused" for o in group),
            "interrupted": sum(o.status == "interrupted" for o in group),
            "errors": sum(o.status == "error" for o in group),
            "latency_p50": percentile(latencies, 0.50),
            "latency_p95": percentile(latencies, 0.95),
            "latency_p99": percentile(latencies, 0.99),
            "first_text_p50": percentile(firsts, 0.50),
        }

    kinds = sorted({o.kind for o in outcomes}, key=lambda k: (KINDS + DISCONNECTING).index(k))
    errors = Counter(o.error for o in outcomes if o.status == "error")
    examples: dict[str, str] = {}
    for outcome in outcomes:
        if outcome.status == "error" and outcome.error not in examples:
            examples[outcome.error] = outcome.detail or ""
    total = stats(outcomes)
    total["requests_per_second"] = total["served"] / wall if wall else 0.0
    return {
        "wall_seconds": wall,
        "total": total,
        "by_kind": {kind: stats([o for o in outcomes if o.kind == kind]) for kind in kinds},
        "errors_by_kind": dict(errors),
        "error_examples": examples,
    }


def run_load(
    url: str,
    config: LoadConfig,
    pid: int | None = None,
    supervisor: ServerSupervisor | None = None,
    disruptions: list[tuple[float, int]] = (),
) -> dict:
    """Warm up, measure memory, run the load, measure again, settle, measure a last time,
    then check the sessions. ``pid``: the server's process, for its resident memory; or a
    ``supervisor`` that runs it, which ``disruptions`` ((seconds into the load, signal), e.g.
    SIGKILL then SIGTERM) stop and start again on the same data during the load. Requests
    that fail while the server is down are counted as interrupted, not as errors; every
    session is checked all the same. Memory is sampled every ``config.sample_seconds``."""

    def current_pid() -> int | None:
        return supervisor.pid() if supervisor is not None else pid

    states = [
        ClientState(i, random.Random(config.seed * 1_000_003 + i)) for i in range(config.clients)
    ]
    warmup_wall = (
        drive(url, config, states, config.warmup_requests) if config.warmup_requests else 0
    )
    warmup_outcomes = [o for state in states for o in state.outcomes]
    for state in states:
        state.outcomes = []
    rss_before = rss_mb(current_pid()) if current_pid() else None
    sampler = MemorySampler(current_pid, config.sample_seconds)
    disturber = threading.Thread(
        target=disturb, args=(supervisor, disruptions), name="disruptions", daemon=True
    )
    sampler.start()
    if disruptions:
        disturber.start()
    wall, rss_rounds = 0.0, []
    for _ in range(config.rounds):
        wall += drive(url, config, states, config.requests)
        rss_rounds.append(rss_mb(current_pid()) if current_pid() else None)
    if disruptions:
        disturber.join()
    rss_after = rss_rounds[-1]
    if config.settle_seconds:
        time.sleep(config.settle_seconds)
    rss_settled = rss_mb(current_pid()) if current_pid() else None
    sampler.stop()
    outcomes = [o for state in states for o in state.outcomes]
    windows = supervisor.windows if supervisor is not None else []
    for outcome in outcomes:
        if outcome.status == "error" and during(outcome, windows):
            outcome.status = "interrupted"
    session_problems = check_sessions(url, config, states)
    report = {
        "config": asdict(config) | {"api_key": bool(config.api_key)},
        "warmup": summarise(warmup_outcomes, warmup_wall),
        "load": summarise(outcomes, wall),
        "sessions_checked": sum(len(state.sessions) for state in states),
        "exchanges_checked": sum(r.completed for state in states for r in state.sessions),
        "session_errors": [o.detail for o in session_problems],
        "disruptions": [
            {"signal": signal.Signals(signum).name, "at": at, "down_seconds": end - begin}
            for (at, signum), (begin, end) in zip(disruptions, windows, strict=False)
        ],
        "memory_mb": {
            "before": rss_before,
            "after_each_round": rss_rounds,
            "after": rss_after,
            "settled": rss_settled,
            "growth": None
            if rss_before is None or rss_settled is None or disruptions
            else rss_settled - rss_before,
            "timeline": sampler.samples,  # [seconds into the load, pid, MB]
            "last_server_peak": sampler.peak_of_last_process(skip_seconds=60),
        },
    }
    report["errors"] = (
        report["warmup"]["total"]["errors"]
        + report["load"]["total"]["errors"]
        + len(session_problems)
    )
    return report


# What a request sees of a server being stopped or killed: anything else is an error even then.
SHUTDOWN_ERRORS = ("connection", "timeout", "stream_incomplete")


def stream_error_type(data: str) -> str | None:
    try:
        return json.loads(data)["error"]["type"]
    except (ValueError, KeyError, TypeError):
        return None


def during(outcome: Outcome, windows: list[list[float]], margin: float = 2.0) -> bool:
    """Whether a request failed the way a server stopped on purpose fails it (its
    connection, the documented ``server_shutdown`` error, or the 503 of a server still
    loading its model) while it was being stopped or started again."""
    restarting = outcome.error_type == "service_unavailable" and "still loading" in (
        outcome.detail or ""
    )  # the restarted server's documented answer until its model is loaded
    if (
        outcome.error not in SHUTDOWN_ERRORS
        and outcome.error_type != "server_shutdown"
        and not restarting
    ):
        return False
    begin, end = outcome.started_at, outcome.started_at + outcome.seconds
    return any(begin <= w_end + margin and end >= w_begin - 0.5 for w_begin, w_end in windows)


def disturb(supervisor: ServerSupervisor | None, disruptions: list[tuple[float, int]]) -> None:
    """Send each signal at its time (seconds from now), then start the server again."""
    started = time.monotonic()
    for at, signum in disruptions:
        time.sleep(max(0.0, started + at - time.monotonic()))
        assert supervisor is not None
        supervisor.disrupt(signum)


class MemorySampler:
    """The server's resident memory every few seconds, from a thread, following restarts."""

    def __init__(self, pid: Callable[[], int | None], every: float) -> None:
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, int, float]] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._started = time.monotonic()

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            pid = self.pid()
            value = rss_mb(pid) if pid else None
            if value is not None:
                self.samples.append((round(time.monotonic() - self._started, 1), pid, value))
            if self._stopped.wait(self.every):
                return

    def peak_of_last_process(self, skip_seconds: float) -> float | None:
        """The highest sample of the last server process, after its first seconds."""
        if not self.samples:
            return None
        last = self.samples[-1][1]
        mine = [(t, mb) for t, pid, mb in self.samples if pid == last]
        later = [mb for t, mb in mine if t - mine[0][0] >= skip_seconds] or [mb for _, mb in mine]
        return max(later)


def format_report(report: dict) -> str:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    config, load = report["config"], report["load"]
    lines = [
        f"{config['clients']} clients, "
        + (f"{config['requests']} requests each" if config["requests"] else "")
        + (f" for at most {config['duration']:.0f} s" if config["duration"] else "")
        + (f", {config['rounds']} rounds" if config["rounds"] > 1 else "")
        + f", max_new_tokens {config['max_new_tokens']}, "
        f"{config['disconnect_fraction']:.0%} disconnecting mid-stream; "
        f"{load['wall_seconds']:.1f} s, {load['total']['requests_per_second']:.2f} requests/s",
        "",
        "| kind | requests | served | disconnected | refused (503 busy) | interrupted (restart) "
        "| errors | p50 (s) | p95 (s) | p99 (s) | first text p50 (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = list(load["by_kind"].items()) + [("total", load["total"])]
    for kind, row in rows:
        lines.append(
            f"| {kind} | {row['requests']} | {row['served']} | {row['disconnected']} | "
            f"{row['refused']} | {row['interrupted']} | {row['errors']} | "
            f"{seconds(row['latency_p50'])} | {seconds(row['latency_p95'])} | "
            f"{seconds(row['latency_p99'])} | {seconds(row['first_text_p50'])} |"
        )
    for disruption in report.get("disruptions", []):
        lines.append(
            f"{disruption['signal']} at {disruption['at']:.0f} s: down (stopped and started "
            f"again) for {disruption['down_seconds']:.1f} s"
        )
    memory = report["memory_mb"]

    def mb(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f} MB"

    growth = memory["growth"]
    lines += [
        "",
        f"Server memory (VmRSS): {mb(memory['before'])} after warm-up, {mb(memory['after'])} "
        f"right after the run, {mb(memory['settled'])} after settling"
        + (
            " (after each round: " + ", ".join(mb(v) for v in memory["after_each_round"]) + ")"
            if len(memory["after_each_round"]) > 1
            else ""
        )
        + ("" if growth is None else f" (growth {growth:+.0f} MB)")
        + (
            f"; the last server process peaked at {mb(memory['last_server_peak'])} "
            f"({len(memory['timeline'])} samples)"
            if memory.get("last_server_peak") is not None
            else ""
        ),
        f"Sessions checked: {report['sessions_checked']} holding "
        f"{report['exchanges_checked']} exchanges; problems: {len(report['session_errors'])}",
        f"Errors: {report['errors']}"
        + (
            f" (load {load['errors_by_kind']}, warm-up {report['warmup']['errors_by_kind']})"
            if report["errors"]
            else ""
        ),
    ]
    for kind, detail in {**report["warmup"]["error_examples"], **load["error_examples"]}.items():
        lines.append(f"  {kind}: {detail}")
    for detail in report["session_errors"][:5]:
        lines.append(f"  session: {detail}")
    if report.get("server_log_errors"):
        lines.append(f"Server log: {len(report['server_log_errors'])} error lines, e.g.")
        lines += [f"  {line}" for line in report["server_log_errors"][:5]]
    return "\n".join(lines)


def server_log_errors(text: str) -> list[str]:
    """Lines of a server's output that report an error (a traceback, an ERROR log line)."""
    markers = ("Traceback", "ERROR", "Exception in ASGI application", "Unhandled error")
    return [line for line in text.splitlines() if any(marker in line for marker in markers)]
