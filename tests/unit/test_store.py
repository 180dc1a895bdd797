import sqlite3
import threading

import pytest

from src.chat.conversation import Conversation
from src.chat.store import SessionStore
from src.errors import SessionBusyError, StorageError

pytestmark = pytest.mark.unit


@pytest.fixture()
def store(tmp_path):
    return SessionStore(tmp_path / "sessions.sqlite3")


def test_a_session_is_written_with_its_first_exchange(store):
    conversation = Conversation(system_prompt="Be kind", persistent=True)
    assert store.get(conversation.id) is None
    assert store.append_exchange(conversation, "hi", "hello")
    loaded = store.get(conversation.id)
    assert loaded.system_prompt == "Be kind" and loaded.saved and loaded.persistent
    assert loaded.messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]


def test_a_session_deleted_while_a_reply_was_written_stays_deleted(store):
    conversation = Conversation(persistent=True)
    store.append_exchange(conversation, "first", "reply")
    assert store.delete(conversation.id)
    assert store.append_exchange(conversation, "second", "late reply") is False
    assert store.get(conversation.id) is None
    assert store.delete(conversation.id) is False


def test_concurrent_appends_to_one_session_all_land(store):
    conversation = Conversation(persistent=True)
    store.append_exchange(conversation, "start", "ok")

    def append(number):
        store.append_exchange(store.get(conversation.id), f"q{number}", f"a{number}")

    threads = [threading.Thread(target=append, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    messages = store.get(conversation.id).messages
    assert len(messages) == 42
    assert {m["content"] for m in messages if m["role"] == "user"} == {
        "start",
        *(f"q{n}" for n in range(20)),
    }


def test_a_session_is_claimed_by_one_reply_at_a_time_from_its_latest_state(store):
    conversation = Conversation(persistent=True)
    store.append_exchange(conversation, "start", "ok")
    first, second = store.get(conversation.id), store.get(conversation.id)
    release = store.claim(first)
    with pytest.raises(SessionBusyError, match="being generated") as busy:
        store.claim(second)
    assert busy.value.field == "session_id"
    store.append_exchange(first, "from the first", "reply")
    release()
    release()  # giving it back twice is harmless
    # The second was read before the first reply was saved: it would not see it.
    with pytest.raises(SessionBusyError, match="changed while"):
        store.claim(second)
    store.claim(store.get(conversation.id))()  # read again, it may go on
    # A session not saved yet (its first exchange) is claimed without reading the store.
    store.claim(Conversation(persistent=True))()


def damaged_database(tmp_path, kind: str):
    path = tmp_path / "sessions.sqlite3"
    if kind == "not-sqlite":
        path.write_bytes(b"this is a text file, not a database\n" * 100)
    elif kind == "truncated":
        store = SessionStore(path)
        for number in range(300):
            store.append_exchange(Conversation(persistent=True), f"hi {number}" * 50, "hello" * 50)
        store.close()
        for leftover in tmp_path.glob("sessions.sqlite3-*"):  # checkpointed on close
            leftover.unlink()
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "folder":
        path.mkdir()
    elif kind == "foreign":
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE sessions (user TEXT, token TEXT)")
        db.commit()
        db.close()
    return path


@pytest.mark.parametrize("kind", ["not-sqlite", "truncated", "folder", "foreign"])
def test_a_damaged_or_foreign_database_is_refused_naming_the_file(tmp_path, kind):
    path = damaged_database(tmp_path, kind)
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(StorageError) as refused:
        SessionStore(path)
    assert str(path) in str(refused.value) and "sessions database" in str(refused.value)
    if before is not None:
        assert path.read_bytes() == before  # nothing was written to it


def test_a_session_whose_stored_messages_are_damaged_is_named_and_the_others_still_work(store):
    good, bad = Conversation(persistent=True), Conversation(persistent=True)
    store.append_exchange(good, "hi", "hello")
    store.append_exchange(bad, "hi", "hello")
    store._db.execute("UPDATE sessions SET messages = '{\"not\": ' WHERE id = ?", (bad.id,))
    with pytest.raises(StorageError, match=f"session {bad.id!r} is damaged"):
        store.get(bad.id)
    with pytest.raises(StorageError, match="is damaged"):
        store.append_exchange(store.get(good.id) and bad, "more", "text")
    assert store.get(good.id).messages[0]["content"] == "hi"
    assert store.delete(bad.id)  # the way out the message suggests works


def test_a_claim_whose_session_cannot_be_read_is_given_back(store, monkeypatch):
    conversation = Conversation(persistent=True)
    store.append_exchange(conversation, "hi", "hello")
    loaded = store.get(conversation.id)

    def unreadable(session_id):
        raise StorageError("sessions database: could not read it (disk I/O error)")

    with monkeypatch.context() as patch:
        patch.setattr(store, "get", unreadable)
        with pytest.raises(StorageError):
            store.claim(loaded)
    store.claim(loaded)()  # not left busy for ever
