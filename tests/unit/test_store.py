import threading

import pytest

from src.chat.conversation import Conversation
from src.chat.store import SessionStore
from src.errors import SessionBusyError

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
