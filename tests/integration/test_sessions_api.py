"""The session routes over real HTTP (uvicorn on 127.0.0.1, a tiny model, a real SQLite file):
list and rename conversations, judge replies (rate, edit, choose a candidate), and export the
judgements as preference pairs that TRL's data utilities read as conversational."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_security import serve

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]


def error_of(response, status: int, param: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    return error["message"]


def test_sessions_are_listed_renamed_judged_and_exported(tmp_path, tiny_llama_path):
    with serve(tmp_path, tiny_llama_path) as live, live.client() as http:
        first = http.post("/chat", json={"message": "Tell me about the sea."}).json()
        session_id = first["session_id"]
        http.post("/chat", json={"message": "And the sky?", "session_id": session_id})
        other = http.post("/chat", json={"message": "Hi", "system_prompt": "Be terse."}).json()

        listed = http.get("/sessions").json()["sessions"]
        assert [s["session_id"] for s in listed] == [other["session_id"], session_id]
        assert listed[1]["title"] == "Tell me about the sea." and listed[1]["messages"] == 4
        assert http.get("/sessions", params={"limit": 1, "offset": 1}).json()["sessions"] == [
            listed[1]
        ]
        renamed = http.patch(f"/sessions/{session_id}", json={"title": "  Sea and sky "})
        assert renamed.status_code == 200 and renamed.json()["title"] == "Sea and sky"

        rated = http.post(
            f"/sessions/{session_id}/feedback",
            json={"message_index": 1, "rating": "bad", "comment": "too short"},
        )
        assert rated.status_code == 201, rated.text
        assert rated.json()["kind"] == "rating" and rated.json()["reply"] == first["response"]
        assert rated.json()["model"] == live.app.state.service.model_name

        edited = http.post(
            f"/sessions/{session_id}/feedback",
            json={"message_index": 1, "edit": "The sea covers most of the Earth."},
        ).json()
        assert (edited["kind"], edited["preferred"]) == (
            "edit",
            "The sea covers most of the Earth.",
        )
        messages = http.get(f"/sessions/{session_id}").json()["messages"]
        assert messages[1]["content"] == "The sea covers most of the Earth."

        candidate = http.post(
            f"/sessions/{session_id}/candidates",
            json={"do_sample": True, "temperature": 1.5, "seed": 7, "max_new_tokens": 6},
        )
        assert candidate.status_code == 201, candidate.text
        candidate = candidate.json()
        assert candidate["message_index"] == 3 and candidate["usage"]["completion_tokens"] >= 1
        assert http.get(f"/sessions/{session_id}").json()["messages"] == messages  # unchanged
        chosen = http.post(
            f"/sessions/{session_id}/feedback",
            json={"message_index": 3, "chosen_candidate": candidate["candidate_id"]},
        ).json()
        assert chosen["kind"] == "choice" and chosen["preferred"] == candidate["content"]
        shown = http.get(f"/sessions/{session_id}").json()["messages"][3]["content"]
        assert shown == candidate["content"]

        feedback = http.get(f"/sessions/{session_id}/feedback").json()["feedback"]
        assert [f["kind"] for f in feedback] == ["rating", "edit", "choice"]
        assert all(f["source"] == "api" for f in feedback)

        # The other session's feedback, then the session deleted with it.
        http.post(
            f"/sessions/{other['session_id']}/feedback", json={"message_index": 1, "rating": "good"}
        )
        assert http.delete(f"/sessions/{other['session_id']}").status_code == 204
        assert http.get(f"/sessions/{other['session_id']}/feedback").status_code == 404
        database = live.app.state.settings.sessions_db

    with sqlite3.connect(database) as db:  # the file itself holds what the API said
        assert db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 3
    out = tmp_path / "pairs.jsonl"
    exported = subprocess.run(
        [sys.executable, "scripts/export_preferences.py", "--db", str(database), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "DATA_DIR": str(tmp_path / "data")},
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert "Exported 2 preference pairs" in exported.stdout
    assert "skipped 1: a rating of a reply already paired" in exported.stdout
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert pairs[0]["prompt"] == [{"role": "user", "content": "Tell me about the sea."}]
    assert pairs[0]["chosen"] == [
        {"role": "assistant", "content": "The sea covers most of the Earth."}
    ]
    assert pairs[1]["prompt"][-1] == {"role": "user", "content": "And the sky?"}
    assert pairs[1]["prompt"][1]["content"] == "The sea covers most of the Earth."

    # The file round-trips through TRL's data loading as conversational preference data, and
    # through the trainer's own reader.
    from datasets import load_dataset
    from trl.data_utils import is_conversational

    from src.training.preference_data import load_pairs

    loaded = load_dataset("json", data_files=str(out), split="train")
    assert loaded.column_names == ["prompt", "chosen", "rejected"] and len(loaded) == 2
    assert all(is_conversational(row) for row in loaded)
    assert loaded[0] == pairs[0]
    assert [pair.chosen for pair in load_pairs(out)] == [
        "The sea covers most of the Earth.",
        candidate["content"],
    ]


def test_bad_feedback_and_session_requests_get_clear_errors(tmp_path, tiny_llama_path):
    with serve(tmp_path, tiny_llama_path) as live, live.client() as http:
        session_id = http.post("/chat", json={"message": "Hi"}).json()["session_id"]
        feedback = f"/sessions/{session_id}/feedback"
        assert "0 is not a reply of this session (its replies are at [1])" in error_of(
            http.post(feedback, json={"message_index": 0, "rating": "good"}), 400, "message_index"
        )
        assert "exactly one of rating, edit, chosen_candidate or rejected_candidate" in error_of(
            http.post(feedback, json={"message_index": 1, "rating": "good", "edit": "x"}),
            400,
            "edit",
        )
        error_of(http.post(feedback, json={"message_index": 1, "rating": "great"}), 422, "rating")
        error_of(http.post(feedback, json={"message_index": 1, "mood": "ok"}), 422, "mood")
        error_of(
            http.post(feedback, json={"message_index": 1, "chosen_candidate": 99}),
            400,
            "chosen_candidate",
        )
        missing = "/sessions/" + "A" * 22
        error_of(
            http.post(missing + "/feedback", json={"message_index": 1, "rating": "good"}),
            404,
            "session_id",
        )
        error_of(http.post(missing + "/candidates", json={}), 404, "session_id")
        error_of(http.patch(missing, json={"title": "x"}), 404, "session_id")
        error_of(http.patch(f"/sessions/{session_id}", json={"title": ""}), 422, "title")
        error_of(http.post("/sessions/nope/feedback", json={"message_index": 1}), 400, "session_id")
        error_of(http.get("/sessions", params={"limit": 0}), 422, "query.limit")
        error_of(
            http.post(f"/sessions/{session_id}/candidates", json={"message_index": 0}),
            400,
            "message_index",
        )
        assert http.get(f"/sessions/{session_id}/feedback").json() == {"feedback": []}
