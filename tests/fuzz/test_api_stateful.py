"""Stateful fuzzing of the session routes over real HTTP: Hypothesis draws sequences of
operations (start a session, continue it plain or streamed, hang up mid-stream, continue with
a system prompt, read, delete, send a session's history to the OpenAI route, judge a reply:
rate it, edit it, or choose a candidate instead) and checks every answer against a model of
what the server must hold:

- a completed exchange is stored exactly, in order, once; a hung-up reply stores nothing;
- a deleted session answers 404 on every route, and stays deleted;
- a session at MAX_HISTORY_MESSAGES answers 409 ``session_full`` and is not changed;
- a system prompt sent to an existing session is a 400 that changes nothing;
- the OpenAI route, which keeps no state, changes no session;
- an edit or a chosen candidate replaces exactly the reply judged; a rating changes no
  message; a judgement of anything but a reply of a live session is a 400 or a 404; every
  judgement accepted is listed, and none of a deleted session.

Against a real uvicorn on 127.0.0.1 serving a tiny Llama with the real tokenizer, as in
test_api_fuzz.py. ``FUZZ_EXAMPLES`` scales the number of sequences.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from src.chat.store import SessionStore
from src.config import load_settings
from src.web.api import create_app
from tests.conftest import GREEDY, make_service, stack_around
from tests.fuzz.cases import count
from tests.fuzz.conftest import examples
from tests.live_server import LiveServer, read_sse

HISTORY_LIMIT = 6  # MAX_HISTORY_MESSAGES: a session is full after three exchanges
SEQUENCES = examples(6)
pytestmark = [pytest.mark.integration, pytest.mark.timeout(max(600, SEQUENCES * 30))]
TEXT = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40
).filter(str.strip)


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_llama_path):
    folder = tmp_path_factory.mktemp("fuzz-stateful")
    config = load_settings(
        _env_file=None,
        data_dir=folder / "data",
        adapters_dir=folder / "adapters",
        max_history_messages=HISTORY_LIMIT,
        max_message_chars=2000,
    )

    def factory(settings):
        service = make_service(
            tiny_llama_path,
            context_window=256,
            default_params=GREEDY.updated(max_new_tokens=6),
            store=SessionStore(settings.sessions_db),
            max_message_chars=settings.max_message_chars,
        )
        return stack_around(service, settings)

    with LiveServer(create_app(config, factory, mount_ui=False)) as server:
        yield server


class Sessions(RuleBasedStateMachine):
    """The model: session id -> the messages it must hold (None once deleted)."""

    sessions = Bundle("sessions")

    def __init__(self, url: str, replies_running: Callable[[], int]) -> None:
        super().__init__()
        self.http = httpx.Client(base_url=url, timeout=60)
        self.replies_running = replies_running
        self.expected: dict[str, list[dict] | None] = {}
        self.judgements: dict[str, int] = {}  # session id -> judgements accepted

    def teardown(self) -> None:
        self.http.close()

    # ---- requests ---------------------------------------------------------------------------

    def send(self, name: str, body: dict, stream: bool) -> tuple[int, dict]:
        """POST /chat or /chat/stream; (status, the ChatResponse or the error body). A session
        still finishing a reply its client hung up on is busy for a moment: retry then."""
        deadline = time.monotonic() + 10
        while True:
            status, answer = self._send(body, stream)
            busy = status == 409 and answer["error"]["type"] == "session_busy"
            if not busy or time.monotonic() > deadline:
                count("stateful", name, status)
                return status, answer
            time.sleep(0.05)

    def _send(self, body: dict, stream: bool) -> tuple[int, dict]:
        if not stream:
            response = self.http.post("/chat", json=body)
            return response.status_code, response.json()
        with self.http.stream("POST", "/chat/stream", json=body) as response:
            if response.status_code != 200:
                response.read()
                return response.status_code, response.json()
            events = read_sse(response)
        assert events[-1][0] == "done", events[-3:]
        return 200, json.loads(events[-1][1])

    def exchange(self, message: str, answer: dict) -> list[dict]:
        return [
            {"role": "user", "content": message},
            {"role": "assistant", "content": answer["response"]},
        ]

    # ---- rules ------------------------------------------------------------------------------

    @rule(target=sessions, message=TEXT, stream=st.booleans(), system=st.none() | TEXT)
    def start(self, message: str, stream: bool, system: str | None) -> str:
        status, answer = self.send("start", {"message": message, "system_prompt": system}, stream)
        assert status == 200, answer
        self.expected[answer["session_id"]] = self.exchange(message, answer)
        return answer["session_id"]

    @rule(session=sessions, message=TEXT, stream=st.booleans())
    def continue_session(self, session: str, message: str, stream: bool) -> None:
        status, answer = self.send("continue", {"message": message, "session_id": session}, stream)
        held = self.expected[session]
        if held is None:
            assert status == 404 and answer["error"]["param"] == "session_id", answer
        elif len(held) + 1 > HISTORY_LIMIT:
            assert status == 409 and answer["error"]["type"] == "session_full", answer
        else:
            assert status == 200 and answer["session_id"] == session, answer
            held += self.exchange(message, answer)

    @rule(session=sessions, message=TEXT)
    def hang_up(self, session: str, message: str) -> None:
        """A streamed continuation whose client leaves after the headers: nothing is stored,
        unless the reply was complete before the server saw the client go (then it is stored
        whole, never in part)."""
        body = {"message": message, "session_id": session, "max_new_tokens": 64}
        with self.http.stream("POST", "/chat/stream", json=body) as response:
            count("stateful", "hang up", response.status_code)
            if response.status_code != 200:
                response.read()
                assert response.status_code in (404, 409), response.text
                return
        deadline = time.monotonic() + 10
        while self.replies_running() and time.monotonic() < deadline:
            time.sleep(0.02)
        held = self.expected[session]
        stored = self.http.get(f"/sessions/{session}").json()["messages"]
        if stored != held:
            assert stored[:-2] == held and stored[-2] == {"role": "user", "content": message}
            held += stored[-2:]
            count("stateful", "hang up (reply finished first)")

    @rule(session=sessions, message=TEXT, system=TEXT)
    def continue_with_a_system_prompt(self, session: str, message: str, system: str) -> None:
        body = {"message": message, "session_id": session, "system_prompt": system}
        status, answer = self.send("system prompt on a session", body, stream=False)
        expected = 404 if self.expected[session] is None else 400
        assert status == expected and answer["error"]["param"] in ("session_id", "system_prompt")

    @rule(session=sessions)
    def read(self, session: str) -> None:
        response = self.http.get(f"/sessions/{session}")
        count("stateful", "read", response.status_code)
        held = self.expected[session]
        if held is None:
            assert response.status_code == 404, response.text
        else:
            assert response.status_code == 200 and response.json()["messages"] == held

    @rule(session=sessions)
    def delete(self, session: str) -> None:
        """Deleted sessions stay in the draw: every later request to them must be a 404."""
        response = self.http.delete(f"/sessions/{session}")
        count("stateful", "delete", response.status_code)
        assert response.status_code == (404 if self.expected[session] is None else 204)
        self.expected[session] = None

    @rule(session=sessions, message=TEXT)
    def ask_openai_with_the_history(self, session: str, message: str) -> None:
        held = self.expected[session] or []
        messages = [*held[-(HISTORY_LIMIT - 1) :], {"role": "user", "content": message}]
        response = self.http.post(
            "/v1/chat/completions", json={"messages": messages, "max_tokens": 4}
        )
        count("stateful", "openai with a history", response.status_code)
        assert response.status_code == 200, response.text

    def judge(self, session: str, index: int, judgement: dict, name: str) -> dict | None:
        """POST a judgement of message ``index``; the answer, if it had to be accepted."""
        body = {"message_index": index, **judgement}
        response = self.http.post(f"/sessions/{session}/feedback", json=body)
        count("stateful", name, response.status_code)
        held = self.expected[session]
        if held is None:
            assert response.status_code == 404, response.text
        elif index >= len(held) or index % 2 == 0:
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == "message_index"
        else:
            assert response.status_code == 201, response.text
            self.judgements[session] = self.judgements.get(session, 0) + 1
            return response.json()
        return None

    @rule(session=sessions, index=st.integers(0, HISTORY_LIMIT), good=st.booleans())
    def rate(self, session: str, index: int, good: bool) -> None:
        self.judge(session, index, {"rating": "good" if good else "bad"}, "rate")

    @rule(session=sessions, index=st.integers(0, HISTORY_LIMIT), text=TEXT)
    def edit(self, session: str, index: int, text: str) -> None:
        answer = self.judge(session, index, {"edit": text}, "edit")
        if answer is not None:
            self.expected[session][index] = {"role": "assistant", "content": text}

    @rule(session=sessions, seed=st.integers(0, 2**31))
    def choose_a_candidate(self, session: str, seed: int) -> None:
        body = {"do_sample": True, "temperature": 1.5, "seed": seed}
        response = self.http.post(f"/sessions/{session}/candidates", json=body)
        count("stateful", "candidate", response.status_code)
        held = self.expected[session]
        if held is None:
            assert response.status_code == 404, response.text
            return
        assert response.status_code == 201, response.text
        candidate = response.json()
        assert self.http.get(f"/sessions/{session}").json()["messages"] == held  # unchanged
        judgement = {"chosen_candidate": candidate["candidate_id"]}
        if self.judge(session, candidate["message_index"], judgement, "choose") is not None:
            held[candidate["message_index"]]["content"] = candidate["content"]

    @invariant()
    def judgements_are_listed_until_their_session_is_deleted(self) -> None:
        for session, accepted in self.judgements.items():
            response = self.http.get(f"/sessions/{session}/feedback")
            if self.expected[session] is None:
                assert response.status_code == 404
            else:
                assert len(response.json()["feedback"]) == accepted, session

    @invariant()
    def sessions_hold_exactly_their_completed_exchanges(self) -> None:
        for session, held in self.expected.items():
            response = self.http.get(f"/sessions/{session}")
            if held is None:
                assert response.status_code == 404
            else:
                assert response.json()["messages"] == held, session


def test_session_sequences(live):
    service = live.app.state.service
    run_state_machine_as_test(
        lambda: Sessions(live.url, service.running_replies),
        settings=settings(
            max_examples=SEQUENCES,
            stateful_step_count=20,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            database=None,
        ),
    )
