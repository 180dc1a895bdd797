"""Faults injected into the real processes (docs/RELIABILITY.md):

- the API server (uvicorn, the bundled model) killed with SIGKILL while replies stream: after
  a restart on the same DATA_DIR every session holds exactly its completed exchanges and the
  SQLite file passes ``PRAGMA integrity_check``;
- the training CLI killed with SIGKILL at random moments (a checkpoint every step, so kills
  land in the middle of writes too) and resumed with ``--resume``, then killed half-way
  through writing a checkpoint: it ends with the same losses at every step, and the same
  adapter, as a run that was never interrupted.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
import torch
import yaml
from safetensors.torch import load_file

from src.benchmarks.processes import start_server, stop, wait_until_ready
from src.config import REPO_ROOT
from src.training import checkpoint as ckpt
from tests.integration.conftest import clean_env
from tests.integration.test_training import DIALOGS, config_for, losses

pytestmark = [pytest.mark.integration]


# ---- the server, killed mid-stream ------------------------------------------------------------


@dataclass
class Session:
    """What a client knows of one session: the exchanges it saw completed, and the one it
    may have in flight when the server dies (its message, the text streamed so far, and
    whether it was streaming)."""

    id: str | None = None
    completed: list[dict] = field(default_factory=list)
    in_flight: tuple[str, str, bool] | None = None
    failures: list[str] = field(default_factory=list)  # answers other than 200, in threads


def exchange(message: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]


def chat(url: str, session: Session, message: str, max_new_tokens: int) -> bool:
    """One /chat exchange; acknowledged only when the reply arrived (returns whether it did)."""
    body = {"message": message, "max_new_tokens": max_new_tokens}
    if session.id:
        body["session_id"] = session.id
    session.in_flight = (message, "", False)
    try:
        response = httpx.post(f"{url}/chat", json=body, timeout=120)
    except httpx.TransportError:
        return False  # the server died: in flight, maybe saved (whole) or not at all
    if response.status_code != 200:
        session.failures.append(f"/chat: {response.status_code} {response.text}")
        return False
    reply = response.json()
    session.id = reply["session_id"]
    session.completed += exchange(message, reply["response"])
    session.in_flight = None
    return True


def stream(url: str, session: Session, message: str, started: threading.Event) -> None:
    """A long streamed reply in ``session``, read until the server dies (or it ends)."""
    body = {"message": message, "max_new_tokens": 400, "session_id": session.id}
    session.in_flight = (message, "", True)
    text = ""
    try:
        with httpx.stream("POST", f"{url}/chat/stream", json=body, timeout=120) as response:
            if response.status_code != 200:
                session.failures.append(f"/chat/stream: {response.status_code}")
            event = None
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "delta":
                    text += json.loads(line[5:])["text"]
                    session.in_flight = (message, text, True)
                    started.set()
                elif line.startswith("data:") and event == "done":
                    session.completed += exchange(message, json.loads(line[5:])["response"])
                    session.in_flight = None
    except httpx.TransportError:
        pass  # the server died mid-stream
    finally:
        started.set()


def check_sessions(url: str, sessions: list[Session]) -> int:
    """Every session holds exactly its completed exchanges. A short exchange in flight when
    the server died may be there whole (committed just before the kill) or not at all; a
    long streamed reply cut by the kill is never there. Returns how many exchanges in flight
    had been saved whole."""
    saved_in_flight = 0
    for session in sessions:
        assert session.failures == []
        if session.id is None:
            continue
        response = httpx.get(f"{url}/sessions/{session.id}", timeout=30)
        assert response.status_code == 200, response.text
        stored = response.json()["messages"]
        if stored == session.completed:
            session.in_flight = None
            continue
        # Not a half exchange: the exchange in flight, whole, and nothing else.
        assert session.in_flight is not None, (session.id, stored, session.completed)
        message, streamed, streaming = session.in_flight
        assert not streaming, f"a reply cut by the kill was saved: {stored[-1]}"
        assert stored[: len(session.completed)] == session.completed
        extra = stored[len(session.completed) :]
        assert [m["role"] for m in extra] == ["user", "assistant"], extra
        assert extra[0]["content"] == message
        assert extra[1]["content"].startswith(streamed)
        session.completed = stored
        session.in_flight = None
        saved_in_flight += 1
    return saved_in_flight


def integrity(database) -> str:
    with sqlite3.connect(database) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


STORY = "Write a long story about a dragon who learns to bake bread. Make it very detailed."


@pytest.mark.timeout(600)
def test_server_killed_mid_stream_keeps_exactly_the_completed_exchanges(
    converted_bundled_model, tmp_path
):
    """Three SIGKILLs at different moments: while streams are starting, once every stream is
    under way, and at a random moment while short exchanges are also being saved."""
    rng = random.Random(7)
    data_dir = tmp_path / "data"
    log = tmp_path / "server.log"
    sessions: list[Session] = []
    kills = saved_in_flight = 0
    env = {"MAX_STREAMS_PER_CLIENT": "64"}
    process, url = start_server(data_dir, log=log, **env)
    for moment in ("streams starting", "streams under way", "random, exchanges saving"):
        wait_until_ready(url, process)
        saved_in_flight += check_sessions(url, sessions)
        # Completed exchanges: two new sessions, and one more exchange in each earlier one.
        sessions += [Session(), Session()]
        for number, session in enumerate(sessions):
            chat(url, session, f"Hello, I am user {number}. What is 2 + {number}?", 4)
        # Long replies streaming in half of the sessions, short exchanges in the others.
        streaming = sessions[::2]
        started = [threading.Event() for _ in streaming]
        threads = [
            threading.Thread(target=stream, args=(url, session, STORY, event), daemon=True)
            for session, event in zip(streaming, started, strict=True)
        ]
        stop_chatting = threading.Event()

        def keep_chatting(session: Session, url=url, stop_chatting=stop_chatting) -> None:
            turn = 1
            while not stop_chatting.is_set() and chat(url, session, f"A word. ({turn})", 2):
                turn += 1

        if moment.startswith("random"):
            threads += [
                threading.Thread(target=keep_chatting, args=(session,), daemon=True)
                for session in sessions[1::2]
            ]
        for thread in threads:
            thread.start()
        if moment == "streams starting":
            time.sleep(0.05)
        else:
            assert all(event.wait(120) for event in started)
            if moment.startswith("random"):
                time.sleep(rng.uniform(0.2, 2.0))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        kills += 1
        stop_chatting.set()
        for thread in threads:
            thread.join(timeout=60)
        assert integrity(data_dir / "sessions.sqlite3") == "ok"
        process, url = start_server(data_dir, log=log, **env)
    try:
        wait_until_ready(url, process)
        saved_in_flight += check_sessions(url, sessions)
        # The restarted server goes on with every session.
        for session in sessions:
            chat(url, session, "One more thing: thank you!", 2)
            assert session.in_flight is None
        check_sessions(url, sessions)
    finally:
        stop(process)
    assert integrity(data_dir / "sessions.sqlite3") == "ok"
    assert kills == 3 and len(sessions) == 6
    # Exchanges in flight at a kill are saved whole or not at all: most are not.
    assert saved_in_flight <= 2 * len(sessions)
    print(
        f"{kills} SIGKILLs; {len(sessions)} sessions holding "
        f"{sum(len(s.completed) // 2 for s in sessions)} exchanges, all intact; "
        f"{saved_in_flight} exchanges in flight were saved whole"
    )


# ---- the sessions database full ---------------------------------------------------------------


def fill_up(store) -> int:
    """Fill the sessions database to its last bytes with filler rows, then forbid it to
    grow: SQLite answers SQLITE_FULL ("database or disk is full") to any write that needs
    room, as on a full disk. Returns the number of filler rows."""
    rows = 0
    with store._lock:
        db = store._db
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")
        for size in (2048, 512, 128, 32, 0):
            while True:
                try:
                    db.execute(
                        "INSERT INTO sessions (id, system_prompt, created, updated) "
                        "VALUES (?, ?, 0, 0)",
                        (f"filler-{rows}", "x" * size),
                    )
                    rows += 1
                except sqlite3.OperationalError:
                    break
    return rows


@pytest.mark.timeout(180)
def test_a_full_sessions_database_is_a_clean_503_and_no_session_is_damaged(
    tiny_llama_path, tmp_path
):
    from src.chat.store import SessionStore
    from src.config import load_settings
    from src.web.api import create_app
    from tests.conftest import GREEDY, make_service, stack_around
    from tests.live_server import LiveServer, read_sse

    settings = load_settings(_env_file=None, data_dir=tmp_path / "data")

    def factory(settings):
        return stack_around(
            make_service(
                tiny_llama_path,
                default_params=GREEDY.updated(max_new_tokens=4),
                store=SessionStore(settings.sessions_db),
                max_reply_tokens=settings.max_length,
            ),
            settings,
        )

    app = create_app(settings, factory, mount_ui=False)
    message = "Tell me everything you know about the sea, please."
    with LiveServer(app) as live, live.client() as http:
        first = http.post("/chat", json={"message": "Hi"}).json()
        session_url = f"/sessions/{first['session_id']}"
        before = http.get(session_url).json()
        store = app.state.service.store
        fillers = fill_up(store)

        for body in ({"message": message, "session_id": first["session_id"]}, {"message": message}):
            full = http.post("/chat", json=body)
            assert full.status_code == 503, full.text
            error = full.json()["error"]
            assert error["type"] == "storage_error"
            assert str(settings.sessions_db) in error["message"]
            assert "database or disk is full" in error["message"]
        body = {"message": message, "session_id": first["session_id"]}
        with http.stream("POST", "/chat/stream", json=body) as response:
            events = read_sse(response)
        assert events[-1][0] == "error" and "database or disk is full" in events[-1][1]
        assert http.get(session_url).json() == before  # unchanged
        assert store.count() == 1 + fillers  # the new session could not be saved: none
        assert http.get("/health").status_code == 200  # the server carries on

        with store._lock:  # the operator makes room
            store._db.execute("DELETE FROM sessions WHERE id LIKE 'filler-%'")
        again = http.post("/chat", json=body)
        assert again.status_code == 200, again.text
        assert len(http.get(session_url).json()["messages"]) == 4
    assert integrity(settings.sessions_db) == "ok"


# ---- training, killed at random moments -------------------------------------------------------

TRAIN = [sys.executable, "src/training/train_lora.py"]

# Runs the training CLI and, at the KILL_AT_SAVE-th call of torch.save (a checkpoint's trainer
# state, written after its adapter), writes half of the file and kills itself with SIGKILL.
KILL_DURING_SAVE = """
import io, os, signal, sys
sys.path.insert(0, os.getcwd())
import torch
from src.training.train_lora import main

real_save, calls = torch.save, []

def save_then_die_half_way(obj, path, *args, **kwargs):
    calls.append(path)
    if len(calls) == int(os.environ["KILL_AT_SAVE"]):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        with open(path, "wb") as handle:
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *args, **kwargs)

torch.save = save_then_die_half_way
sys.exit(main(sys.argv[1:]))
"""


def write_config(tiny_llama_path, dataset, output_dir, path):
    config = config_for(
        tiny_llama_path,
        dataset,
        output_dir,
        max_steps=24,
        gradient_accumulation_steps=1,
        eval_every=6,
        save_every=1,  # a checkpoint at every step: random kills land in writes too
        keep_checkpoints=2,
    )
    path.write_text(yaml.safe_dump(json.loads(config.model_dump_json())))
    return path


def launch(args: list[str], log, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        args,
        cwd=REPO_ROOT,
        env=clean_env(**env),
        stdout=subprocess.PIPE,
        stderr=log.open("a"),
        text=True,
    )


def wait_for_training(process: subprocess.Popen) -> None:
    """Until the CLI says what data it loaded: the model is built, training starts now."""
    for line in process.stdout:
        if line.startswith("Data "):
            return
    raise AssertionError("the training CLI ended before training started")


def run_and_time(args: list[str], log) -> float:
    """Run to completion; return the seconds from the start of training to the end."""
    process = launch(args, log)
    wait_for_training(process)
    started = time.monotonic()
    process.communicate(timeout=240)
    assert process.returncode == 0, log.read_text()[-3000:]
    return time.monotonic() - started


def kill_at_random(args: list[str], log, delay: float) -> bool:
    """SIGKILL the training ``delay`` seconds after it started; False if it finished first."""
    process = launch(args, log)
    wait_for_training(process)
    time.sleep(delay)
    if process.poll() is not None:
        process.communicate()
        return False
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    return True


def assert_same_run(expected_dir, actual_dir) -> None:
    expected, actual = losses(expected_dir), losses(actual_dir)
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for want, got in zip(expected, actual, strict=True):
        for key in ("loss", "lr", "eval_loss"):
            if key in want:
                assert got[key] == pytest.approx(want[key], abs=1e-6), (want["step"], key)
    want = load_file(expected_dir / "adapter_model.safetensors")
    got = load_file(actual_dir / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.allclose(want[name], got[name], atol=1e-6), name


@pytest.fixture()
def dataset(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(
        "".join(
            json.dumps({"messages": exchange(question, answer)}) + "\n"
            for question, answer in DIALOGS
        )
    )
    return path


@pytest.mark.timeout(400)
@pytest.mark.slow  # about a minute: several training runs killed and resumed
def test_training_killed_at_random_moments_resumes_to_the_same_run(
    tiny_llama_path, dataset, tmp_path
):
    log = tmp_path / "training.log"
    config = write_config(tiny_llama_path, dataset, tmp_path / "straight", tmp_path / "s.yaml")
    window = run_and_time([*TRAIN, "--config", str(config)], log)

    config = write_config(tiny_llama_path, dataset, tmp_path / "killed", tmp_path / "k.yaml")
    args = [*TRAIN, "--config", str(config)]
    rng = random.Random(2024)
    kills, resumed_from = 0, []
    for attempt in range(3):
        resume = ["--resume"] if attempt else []
        if kill_at_random(args + resume, log, rng.uniform(0.05, 0.35) * window):
            kills += 1
            # Whatever the moment, --resume finds a complete checkpoint (or none yet).
            latest = ckpt.latest_checkpoint(tmp_path / "killed")
            if latest is not None:
                assert ckpt.load_trainer_state(latest)["step"] == int(latest.name[5:])
                resumed_from.append(latest.name)
    final = subprocess.run(
        args + ["--resume"], cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True
    )
    assert final.returncode == 0, final.stderr[-3000:]
    assert "Done: 24 steps" in final.stdout
    assert kills >= 2, "the runs ended before they could be killed"
    assert_same_run(tmp_path / "straight", tmp_path / "killed")

    # Killed half-way through writing a checkpoint: the half-written one is never used.
    config = write_config(tiny_llama_path, dataset, tmp_path / "half", tmp_path / "h.yaml")
    killed = launch(
        [sys.executable, "-c", KILL_DURING_SAVE, "--config", str(config)], log, KILL_AT_SAVE="5"
    )
    killed.communicate(timeout=240)
    assert killed.returncode == -signal.SIGKILL
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "half")]
    assert names == ["step-000003", "step-000004"]  # step 5's write was cut short
    assert (tmp_path / "half" / "checkpoints" / ".step-000005.partial").is_dir()
    resumed = subprocess.run(
        [*TRAIN, "--config", str(config), "--resume"],
        cwd=REPO_ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Done: 24 steps" in resumed.stdout
    assert_same_run(tmp_path / "straight", tmp_path / "half")
    assert not (tmp_path / "half" / "checkpoints" / ".step-000005.partial").exists()
    print(
        f"training: {kills} random SIGKILLs (resumed from {resumed_from}; training takes "
        f"{window:.1f} s) and 1 SIGKILL half-way through a checkpoint write"
    )


class Interrupted(Exception):
    pass


@pytest.mark.timeout(300)
def test_a_fresh_run_never_resumes_from_an_earlier_runs_checkpoints(
    tiny_llama_path, dataset, tmp_path
):
    """A run started without --resume in a folder that holds an earlier (finished) run's
    checkpoints, then killed: --resume continues this run, not the earlier one."""
    from src.training.train_lora import build_trainer

    output = tmp_path / "run"
    earlier, _ = build_trainer(config_for(tiny_llama_path, dataset, output))
    earlier.train()
    assert ckpt.latest_checkpoint(output).name == "step-000008"

    fresh, _ = build_trainer(config_for(tiny_llama_path, dataset, output, learning_rate=1e-3))

    def killed_after_step_five():
        if fresh.step == 5:
            raise Interrupted

    fresh.after_step = killed_after_step_five
    with pytest.raises(Interrupted):
        fresh.train()
    assert [p.name for p in ckpt.list_checkpoints(output)] == ["step-000002", "step-000004"]
    resumed, _ = build_trainer(config_for(tiny_llama_path, dataset, output, learning_rate=1e-3))
    resumed.train(resume=True)
    assert resumed.step == 8
    steps = [r["step"] for r in losses(output)]
    assert steps == list(range(9))
