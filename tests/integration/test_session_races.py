"""Writes that race, with real concurrent clients over HTTP (a real uvicorn, a real SQLite
file): one reply at a time per session, generated from its latest state; a full session stays
within MAX_HISTORY_MESSAGES; a session deleted during a reply stays deleted. Each race has
one defined outcome: no exchange lost, duplicated or attached to the wrong turn."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.integration.test_security import Gate, assert_error, serve, wait_until
from tests.live_server import read_sse

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def start_session(http: httpx.Client, exchanges: int) -> tuple[str, list[dict]]:
    session, messages = None, []
    for number in range(exchanges):
        body = {"message": f"message {number}", **({"session_id": session} if session else {})}
        answer = http.post("/chat", json=body).json()
        session = answer["session_id"]
        messages += [
            {"role": "user", "content": body["message"]},
            {"role": "assistant", "content": answer["response"]},
        ]
    return session, messages


def test_concurrent_continuations_of_one_session_run_one_at_a_time(tmp_path, tiny_llama_path):
    """The probe's case: eight continuations of a 4-message session at once, with
    MAX_HISTORY_MESSAGES=6. Before, all eight got 200 and the session held 20 messages, each
    reply generated without seeing the others."""
    gate = Gate()
    with serve(tmp_path, tiny_llama_path, gate=gate, max_history_messages=6) as live:
        with live.client() as http:
            session, messages = start_session(http, 2)
        gate.delay = 0.1  # each reply takes about half a second: they overlap
        barrier = threading.Barrier(8)
        answers: dict[int, httpx.Response] = {}

        def continue_session(number: int) -> None:
            with live.client() as http:
                barrier.wait()
                body = {"message": f"racer {number}", "session_id": session}
                answers[number] = http.post("/chat", json=body)

        threads = [threading.Thread(target=continue_session, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)

        served = {n: r.json() for n, r in answers.items() if r.status_code == 200}
        refused = {n: r.json()["error"] for n, r in answers.items() if r.status_code != 200}
        assert len(served) == 1, answers  # the 4 messages + 1 exchange fill the 6 allowed
        for error in refused.values():
            assert error["type"] in ("session_busy", "session_full"), error
            assert error["param"] == "session_id"
        assert any(error["type"] == "session_busy" for error in refused.values())
        assert all(r.status_code in (200, 409) for r in answers.values())

        with live.client() as http:
            stored = http.get(f"/sessions/{session}").json()["messages"]
        [(number, answer)] = served.items()
        assert stored == messages + [
            {"role": "user", "content": f"racer {number}"},
            {"role": "assistant", "content": answer["response"]},
        ]


def test_a_second_stream_on_a_busy_session_is_refused_and_the_session_frees_up(
    tmp_path, tiny_llama_path
):
    gate = Gate()
    with serve(tmp_path, tiny_llama_path, gate=gate) as live, live.client() as http:
        session, messages = start_session(http, 1)
        gate.open.clear()  # the first continuation holds the session
        first = {"message": "first", "session_id": session, "max_new_tokens": 3}
        with http.stream("POST", "/chat/stream", json=first) as running:
            assert running.status_code == 200
            for route in ("/chat/stream", "/chat"):
                second = {"message": "second", "session_id": session}
                error = assert_error(http.post(route, json=second), 409, "session_busy")
                assert "being generated" in error["message"]
            gate.open.set()
            done = read_sse(running)[-1]
        assert done[0] == "done"
        # Its reply is saved; the session takes the next message, which sees it.
        answer = http.post("/chat", json={"message": "third", "session_id": session})
        assert answer.status_code == 200
        stored = http.get(f"/sessions/{session}").json()["messages"]
        assert [m["content"] for m in stored[len(messages) :: 2]] == ["first", "third"]

        # A client that hangs up gives the session back too.
        gate.delay = 0.3
        with http.stream("POST", "/chat/stream", json=first) as abandoned:
            assert abandoned.status_code == 200
        gate.delay = 0.0
        retry = {"message": "after a hang-up", "session_id": session}
        wait_until(lambda: http.post("/chat", json=retry).status_code == 200)
        stored_after = http.get(f"/sessions/{session}").json()["messages"]
        assert len(stored_after) == len(stored) + 2  # the abandoned reply was not kept


def test_a_session_deleted_during_a_reply_stays_deleted(tmp_path, tiny_llama_path):
    gate = Gate()
    with serve(tmp_path, tiny_llama_path, gate=gate) as live, live.client() as http:
        session, _ = start_session(http, 1)
        gate.open.clear()
        body = {"message": "still there?", "session_id": session}
        with http.stream("POST", "/chat/stream", json=body) as running:
            assert running.status_code == 200
            assert http.delete(f"/sessions/{session}").status_code == 204
            gate.open.set()
            event, _ = read_sse(running)[-1]
        assert event == "done"  # the client gets its reply ...
        assert_error(http.get(f"/sessions/{session}"), 404)  # ... and the session stays deleted
        assert live.app.state.service.store.count() == 0
