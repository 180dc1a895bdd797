"""A clean shutdown: SIGTERM to a real uvicorn (`python -m uvicorn src.web.api:app`, the bundled
model) while several replies stream. Replies that can finish within the grace period do and
are saved; the others end with a final event that says the server is shutting down, and are
not saved; no client hangs; the process exits within the grace period plus a few seconds; the
sessions database is intact."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from src.benchmarks.processes import start_server, stop, wait_until_ready
from src.config import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

GRACE_SECONDS = 8  # long enough for the short reply to finish on a busy machine
ESSAY = {"role": "user", "content": "Write an essay."}
LONG = 1000  # tokens: far longer than the grace period at this model's speed


@dataclass
class Stream:
    """One streamed request, read to its end in a thread."""

    route: str
    body: dict
    events: list[tuple[str | None, dict | str]] = field(default_factory=list)
    first_delta: threading.Event = field(default_factory=threading.Event)
    ended_at: float | None = None
    failure: str | None = None

    def run(self, url: str) -> None:
        try:
            with httpx.stream("POST", url + self.route, json=self.body, timeout=60) as response:
                if response.status_code != 200:
                    self.failure = f"{response.status_code} {response.read()!r}"
                    return
                event = None
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        raw = line[5:].strip()
                        self.events.append((event, raw if raw == "[DONE]" else json.loads(raw)))
                        self.first_delta.set()
                        event = None
        except httpx.HTTPError as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
        finally:
            self.ended_at = time.monotonic()
            self.first_delta.set()

    def last(self) -> tuple[str | None, dict | str]:
        return self.events[-1] if self.events else (None, {})


def test_sigterm_drains_then_interrupts_and_saves_only_completed_exchanges(
    converted_bundled_model, tmp_path
):
    process, url = start_server(
        tmp_path,
        log=tmp_path / "server.log",
        MODEL_NAME="smollm2-135m-instruct",
        MODEL_CACHE_DIR=str(REPO_ROOT / "models"),
        SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS),
        MAX_LENGTH="1024",
        DO_SAMPLE="false",
    )
    try:
        wait_until_ready(url, process)
        # A completed exchange before the shutdown: it must survive untouched.
        first = httpx.post(
            f"{url}/chat", json={"message": "Hi!", "max_new_tokens": 8}, timeout=60
        ).json()
        session = first["session_id"]
        streams = [
            # Continues the saved session, and outlives the grace period.
            Stream("/chat/stream", {"message": "Tell me a long story.", "session_id": session,
                                    "max_new_tokens": LONG, "repetition_penalty": 1.3}),
            # A new session that outlives the grace period: never saved.
            Stream("/chat/stream", {"message": "Count to a thousand.", "max_new_tokens": LONG,
                                    "repetition_penalty": 1.3}),
            # OpenAI's streaming route, also cut off.
            Stream("/v1/chat/completions", {"messages": [ESSAY], "max_tokens": LONG,
                                            "stream": True, "repetition_penalty": 1.3}),
            # Short enough to finish within the grace period: saved whole.
            Stream("/chat/stream", {"message": "Say hello.", "max_new_tokens": 3}),
        ]  # fmt: skip
        threads = [threading.Thread(target=s.run, args=(url,), daemon=True) for s in streams]
        for thread in threads[:3]:
            thread.start()
        for stream in streams[:3]:
            assert stream.first_delta.wait(60), stream.failure
        threads[3].start()
        assert streams[3].first_delta.wait(60), streams[3].failure

        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(GRACE_SECONDS + 30)
            assert not thread.is_alive(), "a client still waits after the shutdown"
        process.wait(GRACE_SECONDS + 10)
        exited = time.monotonic() - signalled
    finally:
        stop(process)
    log = (tmp_path / "server.log").read_text()

    assert exited < GRACE_SECONDS + 8, f"exited {exited:.1f} s after SIGTERM\n{log}"
    for stream in streams:
        assert stream.failure is None, stream.failure
    # The long replies: a final error event of type server_shutdown, after some text.
    for stream in streams[:2]:
        event, data = stream.last()
        assert event == "error" and data["error"]["type"] == "server_shutdown", stream.events[-3:]
        assert "not saved" in data["error"]["message"]
        assert any(event == "delta" for event, _ in stream.events)
    _, data = streams[2].last()
    assert data["error"]["type"] == "server_shutdown", streams[2].events[-3:]
    assert streams[2].ended_at - signalled >= GRACE_SECONDS - 0.5  # it had its grace period
    # The short reply finished within the grace period.
    event, done = streams[3].last()
    assert event == "done" and done["finish_reason"] in ("stop", "length"), streams[3].events[-3:]

    database = sqlite3.connect(tmp_path / "sessions.sqlite3")
    try:
        assert database.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        database.close()

    # Restarted on the same data: exactly the completed exchanges, no half exchange.
    process, url = start_server(
        tmp_path,
        MODEL_NAME="smollm2-135m-instruct",
        MODEL_CACHE_DIR=str(REPO_ROOT / "models"),
    )
    try:
        wait_until_ready(url, process)
        kept = httpx.get(f"{url}/sessions/{session}", timeout=30).json()["messages"]
        assert kept == [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": first["response"]},
        ]
        short = httpx.get(f"{url}/sessions/{done['session_id']}", timeout=30).json()["messages"]
        assert short == [
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": done["response"]},
        ]
    finally:
        stop(process)


def test_a_second_signal_interrupts_at_once_answers_in_the_error_shape_and_saves_nothing(
    converted_bundled_model, tmp_path
):
    """SIGTERM with a long grace period, then Ctrl-C (SIGINT) during it: the replies in flight,
    streamed or not, end at once with the documented error (not uvicorn's forced exit, which
    dropped them with a plain-text 500 and let them go on generating and saving)."""
    grace = 120
    process, url = start_server(
        tmp_path,
        log=tmp_path / "server.log",
        SHUTDOWN_GRACE_SECONDS=str(grace),
        MAX_LENGTH="1024",
        DO_SAMPLE="false",
    )
    answers: dict[str, httpx.Response | str] = {}

    def post(name: str, route: str, body: dict) -> None:
        try:
            answers[name] = httpx.post(url + route, json=body, timeout=grace + 30)
        except httpx.HTTPError as exc:
            answers[name] = f"{type(exc).__name__}: {exc}"

    try:
        wait_until_ready(url, process)
        first = httpx.post(
            f"{url}/chat", json={"message": "Hi!", "max_new_tokens": 8}, timeout=60
        ).json()
        session = first["session_id"]
        long = {"repetition_penalty": 1.3}
        plain = [
            ("chat", "/chat", {"message": "Tell me a long story.", "session_id": session,
                               "max_new_tokens": LONG, **long}),
            ("openai", "/v1/chat/completions", {"messages": [ESSAY], "max_tokens": LONG, **long}),
        ]  # fmt: skip
        threads = [threading.Thread(target=post, args=args, daemon=True) for args in plain]
        stream = Stream("/chat/stream", {"message": "Count to a thousand.", "max_new_tokens": LONG,
                                         **long})  # fmt: skip
        threads.append(threading.Thread(target=stream.run, args=(url,), daemon=True))
        for thread in threads:
            thread.start()
        assert stream.first_delta.wait(60), stream.failure
        time.sleep(1.0)  # the replies that are not streamed are generating too

        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert not answers, "the grace period was not respected"
        forced = time.monotonic()
        process.send_signal(signal.SIGINT)
        for thread in threads:
            thread.join(30)
            assert not thread.is_alive(), "a client still waits after the second signal"
        answered = time.monotonic() - forced
        process.wait(30)
        exited = time.monotonic() - forced
    finally:
        stop(process)
    log = (tmp_path / "server.log").read_text()

    assert answered < 10 and exited < 15, f"answered {answered:.1f} s, exited {exited:.1f} s\n{log}"
    for name in ("chat", "openai"):
        response = answers[name]
        assert isinstance(response, httpx.Response), response
        assert response.status_code == 503, response.text
        assert response.json()["error"]["type"] == "server_shutdown"
    event, data = stream.last()
    assert event == "error" and data["error"]["type"] == "server_shutdown", stream.events[-3:]
    assert "Traceback" not in log, log

    database = sqlite3.connect(tmp_path / "sessions.sqlite3")
    try:
        rows = database.execute("SELECT id, messages FROM sessions").fetchall()
    finally:
        database.close()
    assert [(sid, json.loads(messages)) for sid, messages in rows] == [
        (session, [{"role": "user", "content": "Hi!"},
                   {"role": "assistant", "content": first["response"]}])
    ]  # fmt: skip
