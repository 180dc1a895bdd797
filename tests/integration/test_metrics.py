"""Observability over real HTTP (uvicorn on 127.0.0.1, a tiny model): GET /metrics in
Prometheus' text format moves as requests of every protocol are served, each response carries
a request id, and each request leaves one log line with that id, its route, status and
tokens."""

from __future__ import annotations

import json
import logging
import re

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from src.config import load_settings
from src.web.api import create_app
from src.web.metrics import JSONLines
from tests.integration.test_security import KEY, factory_for
from tests.live_server import LiveServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

USER = {"role": "user", "content": "Hi"}


def said(text: str) -> dict:
    return {"role": "user", "content": text}


def serve(tmp_path, tiny_llama_path, **overrides) -> LiveServer:
    settings = load_settings(
        _env_file=None, data_dir=tmp_path / "data", adapters_dir=tmp_path / "adapters", **overrides
    )
    return LiveServer(create_app(settings, factory_for(tiny_llama_path), mount_ui=False))


def scrape(http: httpx.Client, **kwargs) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    response = http.get("/metrics", **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class Lines(logging.Handler):
    """The request log's records, formatted as LOG_FORMAT=json writes them."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JSONLines())
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture()
def request_log():
    lines = Lines()
    logger = logging.getLogger("src.web.requests")
    logger.addHandler(lines)
    yield lines.lines
    logger.removeHandler(lines)


def test_metrics_move_as_every_protocol_is_served(tmp_path, tiny_llama_path, request_log):
    with serve(tmp_path, tiny_llama_path) as live, live.client() as http:
        before = scrape(http)
        # Four different prompts: none is answered from the reply cache.
        model = live.app.state.service.model_name
        replies = [
            http.post("/chat", json={"message": "Hi"}),
            http.post("/v1/chat/completions", json={"messages": [said("Hello")], "stream": True}),
            http.post(
                "/v1/messages", json={"model": "m", "max_tokens": 4, "messages": [said("Hey")]}
            ),
            http.post(
                "/api/chat", json={"model": model, "messages": [said("Howdy")], "stream": False}
            ),
        ]
        assert all(reply.status_code == 200 for reply in replies), [r.text for r in replies]
        refused = http.post("/v1/chat/completions", json={"messages": []})
        assert refused.status_code == 422
        after = scrape(http)

    def grew(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for route, protocol in (
        ("/chat", "mini-claude"),
        ("/v1/chat/completions", "openai"),
        ("/v1/messages", "anthropic"),
        ("/api/chat", "ollama"),
    ):
        assert grew("minicl_requests_total", route=route, protocol=protocol, status="200") == 1
        refusals = 1 if route == "/v1/chat/completions" else 0  # the 422 is timed too
        timed = grew("minicl_request_duration_seconds_count", route=route, protocol=protocol)
        assert timed == 1 + refusals
    assert (
        grew("minicl_requests_total", route="/v1/chat/completions", protocol="openai", status="422")
        == 1
    )
    # Four replies: each observed once, its tokens counted (the log lines say how many).
    assert grew("minicl_time_to_first_token_seconds_count") == 4
    longer = sum(1 for line in request_log if line["completion_tokens"] > 1)
    assert grew("minicl_time_per_output_token_seconds_count") == longer
    completion = sum(line["completion_tokens"] for line in request_log)
    assert grew("minicl_completion_tokens_total") == completion > 4
    prompt = sum(line["prompt_tokens"] for line in request_log)
    assert grew("minicl_prompt_tokens_total") == prompt
    assert grew("minicl_batch_size_count") > 0 and grew("minicl_batch_size_sum") > 0
    assert value(after, "minicl_requests_running") == value(after, "minicl_requests_waiting") == 0
    assert value(after, "minicl_kv_cache_bytes") == 0  # nothing running
    assert value(after, "minicl_adapter_loads_total") == 0


def test_each_response_has_a_request_id_and_a_log_line(tmp_path, tiny_llama_path, request_log):
    with serve(tmp_path, tiny_llama_path) as live, live.client() as http:
        mine = http.post("/chat", json={"message": "Hi"}, headers={"X-Request-ID": "trace-42"})
        made = http.post("/v1/chat/completions", json={"messages": [USER], "stream": True})
        odd = http.get("/v1/models", headers={"X-Request-ID": "no spaces\tor tabs"})
    assert mine.headers["x-request-id"] == "trace-42"
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["x-request-id"])  # replaced, not logged
    by_id = {line["request_id"]: line for line in request_log}
    line = by_id["trace-42"]
    assert line["route"] == "/chat" and line["status"] == 200 and line["method"] == "POST"
    assert line["completion_tokens"] > 0 and line["prompt_tokens"] > 0 and line["seconds"] > 0
    streamed = by_id[made.headers["x-request-id"]]  # counted although the reply streamed
    assert streamed["completion_tokens"] > 0 and streamed["protocol"] == "openai"
    assert streamed["first_token_seconds"] is not None


def test_metrics_need_the_key_unless_opened_for_a_scraper(tmp_path, tiny_llama_path):
    with serve(tmp_path, tiny_llama_path, api_key=KEY) as live, live.client() as http:
        assert http.get("/metrics").status_code == 401
        scrape(http, headers={"Authorization": f"Bearer {KEY}"})
    with (
        serve(tmp_path / "open", tiny_llama_path, api_key=KEY, metrics_public=True) as live,
        live.client() as http,
    ):
        scrape(http)
        assert http.get("/v1/models").status_code == 401  # only /metrics is opened
