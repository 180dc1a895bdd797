"""What the server is doing, in Prometheus' text format (``GET /metrics``, with
prometheus-client), and one log line per request.

Three sources:
- each request as it passes (``RequestObserver``, ASGI middleware): counted by route,
  protocol and status, its end-to-end time observed, a request id given (or taken from the
  client's ``X-Request-ID``) and returned in the response's header and the log line;
- each reply as it ends (the services' result observers): time to first token, time per
  output token, tokens in and out;
- the engines, read at each scrape (``EngineCollector``): requests running and waiting, the
  rows of each decoding step (batch size), prefix cache lookups, hits and memory, the memory
  keys and values hold, adapters loaded and evicted.

Each app has its own registry (tests build many apps in one process).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from src.chat.service import ChatResult
from src.web.protocols import protocol_of, route_path

logger = logging.getLogger("src.web.requests")

REQUEST_ID_HEADER = "x-request-id"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_TIME_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class RequestRecord:
    """What one request did, filled in as its replies end (for its log line)."""

    request_id: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_seconds: float | None = None


CURRENT_REQUEST: ContextVar[RequestRecord | None] = ContextVar("current_request", default=None)


@dataclass
class ServerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = Counter(
            "minicl_requests",
            "HTTP requests answered, by route, protocol and status",
            ["route", "protocol", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "minicl_request_duration_seconds",
            "End-to-end time of a request, until its last byte (streams included)",
            ["route", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "minicl_time_to_first_token_seconds",
            "From a reply's start to its first token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.per_token = Histogram(
            "minicl_time_per_output_token_seconds",
            "A reply's time after its first token, per further token",
            buckets=TOKEN_TIME_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "minicl_prompt_tokens", "Prompt tokens of finished replies", registry=self.registry
        )
        self.completion_tokens = Counter(
            "minicl_completion_tokens",
            "Tokens generated in finished replies",
            registry=self.registry,
        )

    def observe_reply(self, result: ChatResult) -> None:
        """A reply ended (a service's result observer)."""
        self.prompt_tokens.inc(result.prompt_tokens)
        self.completion_tokens.inc(result.completion_tokens)
        if result.first_token_seconds is not None and not result.cached:
            self.first_token.observe(result.first_token_seconds)
            if result.completion_tokens > 1:
                rest = result.seconds - result.first_token_seconds
                self.per_token.observe(max(rest, 0.0) / (result.completion_tokens - 1))
        record = CURRENT_REQUEST.get()
        if record is not None:
            record.prompt_tokens += result.prompt_tokens
            record.completion_tokens += result.completion_tokens
            if record.first_token_seconds is None:
                record.first_token_seconds = result.first_token_seconds

    def watch(self, app_state: Any) -> None:
        """Read the engines of ``app_state.adapters`` (once the model is loaded) at each
        scrape."""
        self.registry.register(EngineCollector(app_state))


class EngineCollector:
    """Gauges and counters read from the loaded services at scrape time."""

    def __init__(self, app_state: Any) -> None:
        self.app_state = app_state

    def collect(self) -> Iterator[Any]:
        pool = getattr(self.app_state, "adapters", None)
        if pool is None:  # still loading
            return
        services = pool.services()
        engines = [s.backend.engine for s in services if s.backend.kind == "local"]
        running = GaugeMetricFamily(
            "minicl_requests_running", "Replies started and not ended (queued ones included)"
        )
        running.add_metric([], sum(service.running_replies() for service in services))
        yield running
        waiting = GaugeMetricFamily(
            "minicl_requests_waiting", "Requests queued for a row of a batch, not yet admitted"
        )
        waiting.add_metric([], sum(engine.waiting_requests() for engine in engines))
        yield waiting
        yield batch_histogram(engines)
        yield from cache_metrics(engines)
        adapters = CounterMetricFamily("minicl_adapter_loads", "LoRA adapters loaded")
        adapters.add_metric([], pool.loads)
        yield adapters
        evictions = CounterMetricFamily("minicl_adapter_evictions", "LoRA adapters unloaded")
        evictions.add_metric([], pool.evictions)
        yield evictions
        loaded = GaugeMetricFamily("minicl_adapters_loaded", "LoRA adapters in memory now")
        loaded.add_metric([], len(pool.loaded()))
        yield loaded


def batch_histogram(engines: list[Any]) -> HistogramMetricFamily:
    """The rows of each decoding step, over every engine, as a histogram."""
    counts: dict[int, int] = {}
    for engine in engines:
        for rows, steps in list(engine.batch_sizes.items()):
            counts[rows] = counts.get(rows, 0) + steps
    buckets, below = [], 0
    for bound in BATCH_BUCKETS:
        below = sum(steps for rows, steps in counts.items() if rows <= bound)
        buckets.append((str(bound), below))
    buckets.append(("+Inf", sum(counts.values())))
    total = sum(rows * steps for rows, steps in counts.items())
    histogram = HistogramMetricFamily(
        "minicl_batch_size", "Rows (replies) decoded together in each decoding step"
    )
    histogram.add_metric([], buckets, total)
    return histogram


def cache_metrics(engines: list[Any]) -> Iterator[Any]:
    """The prefix cache and the keys and values budget, shared by the engines of a server."""
    caches = {id(e.prefix_cache): e.prefix_cache for e in engines if e.prefix_cache is not None}
    lookups = CounterMetricFamily("minicl_prefix_cache_lookups", "Prompts looked up")
    hits = CounterMetricFamily("minicl_prefix_cache_hits", "Prompts whose start was cached")
    size = GaugeMetricFamily("minicl_prefix_cache_bytes", "Memory the prefix cache holds")
    lookups.add_metric([], sum(cache.lookups for cache in caches.values()))
    hits.add_metric([], sum(cache.hits for cache in caches.values()))
    size.add_metric([], sum(cache.nbytes for cache in caches.values()))
    yield from (lookups, hits, size)
    budgets = {id(e.kv_budget): e.kv_budget for e in engines if e.kv_budget is not None}
    held = GaugeMetricFamily(
        "minicl_kv_cache_bytes", "Memory held for the keys and values of running batches"
    )
    held.add_metric([], sum(budget.used() for budget in budgets.values()))
    yield held


class RequestObserver:
    """ASGI middleware: a request id for every HTTP request (the client's ``X-Request-ID``
    if it sent a sensible one), returned as a header; the request counted and timed by its
    route's template, protocol and status; one log line when its last byte is sent."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        given = headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        record = RequestRecord(given if usable_id(given) else uuid.uuid4().hex)
        status = 500  # until the response says otherwise (an app that crashes sends none)

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (REQUEST_ID_HEADER.encode(), record.request_id.encode()),
                ]
            await send(message)

        token = CURRENT_REQUEST.set(record)
        try:
            await self.app(scope, receive, observed)
        finally:
            CURRENT_REQUEST.reset(token)
            self._finish(scope, record, status, time.perf_counter() - started)

    def _finish(self, scope: Scope, record: RequestRecord, status: int, seconds: float) -> None:
        path = route_path(scope)
        route = route_template(scope) or "(no route)"  # not one label per unknown path
        protocol = protocol_of(path)
        self.metrics.requests.labels(route, protocol, str(status)).inc()
        self.metrics.latency.labels(route, protocol).observe(seconds)
        fields = {
            "request_id": record.request_id,
            "method": scope.get("method", ""),
            "route": route,
            "protocol": protocol,
            "status": status,
            "seconds": round(seconds, 3),
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "first_token_seconds": None
            if record.first_token_seconds is None
            else round(record.first_token_seconds, 3),
        }
        message = (
            f"{record.request_id} {fields['method']} {route} -> {status} in {seconds:.3f} s "
            f"(tokens {record.prompt_tokens} in, {record.completion_tokens} out) [{protocol}]"
        )
        logger.info(message, extra={"fields": fields})


class JSONLines(logging.Formatter):
    """LOG_FORMAT=json: each record as one JSON object (a request's fields, when it has
    them)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {"message": record.getMessage()}
        return json.dumps({"time": self.formatTime(record), "level": record.levelname, **fields})


def configure_request_log(log_format: str) -> None:
    """The request log on stderr, in text or JSON lines (LOG_FORMAT); set again by each app
    (one handler, never one per app)."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JSONLines())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s request %(message)s"))
    handler.set_name("mini-claude-requests")
    for old in [h for h in logger.handlers if h.get_name() == "mini-claude-requests"]:
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def usable_id(value: str) -> bool:
    """A client's request id is kept if it is short and plain (it goes into logs)."""
    return 0 < len(value) <= 64 and all(c.isalnum() or c in "-_." for c in value)


def route_template(scope: Scope) -> str | None:
    """The matched route's path template (``/sessions/{session_id}``), so that ids do not
    make a label per request; None when no route matched (a 404)."""
    route = scope.get("route")
    return getattr(route, "path", None)
