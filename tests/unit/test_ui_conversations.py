"""Which stored conversations the chat page lists, to whom (the rule of GET /sessions), and
undo on the store."""

from types import SimpleNamespace

import gradio as gr
import pytest
from pydantic import SecretStr

from src.chat.conversation import Conversation
from src.chat.store import SessionStore
from src.web.ui_conversations import undo_last_exchange, visible_conversations

pytestmark = pytest.mark.unit


def request_from(host: str):
    return SimpleNamespace(client=SimpleNamespace(host=host))


@pytest.fixture()
def store(tmp_path):
    store = SessionStore(tmp_path / "sessions.sqlite3")
    for text in ("first", "second", "third"):
        store.append_exchange(Conversation(persistent=True), text, f"re: {text}")
    yield store
    store.close()


def test_this_machine_or_the_key_holder_sees_every_conversation(store):
    everything = [summary.title for summary in store.summaries()]
    assert everything == ["third", "second", "first"]
    local = visible_conversations(store, request_from("127.0.0.1"), None, [])
    remote_with_key = visible_conversations(store, request_from("203.0.113.5"), SecretStr("k"), [])
    assert [s.title for s in local] == [s.title for s in remote_with_key] == everything


def test_another_browser_of_an_open_server_sees_only_the_conversations_it_started(store):
    first, _, third = reversed(store.summaries())
    mine = [first.id, third.id, "A" * 22]  # one of them deleted since
    seen = visible_conversations(store, request_from("203.0.113.5"), None, mine)
    assert [s.title for s in seen] == ["third", "first"]
    assert visible_conversations(store, request_from("203.0.113.5"), None, []) == []


def test_undo_removes_the_last_exchange_and_an_emptied_conversation(store):
    conversation = Conversation(persistent=True)
    store.append_exchange(conversation, "a", "b")
    store.append_exchange(store.get(conversation.id), "c", "d")
    assert undo_last_exchange(store, conversation.id) == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]
    assert undo_last_exchange(store, conversation.id) == []
    assert store.get(conversation.id) is None
    with pytest.raises(gr.Error, match="no exchange to undo"):
        undo_last_exchange(store, conversation.id)
    busy = store.get(store.summaries()[0].id)
    release = store.claim(busy)  # a reply to it is being generated (another tab)
    with pytest.raises(gr.Error, match="is being generated"):
        undo_last_exchange(store, busy.id)
    release()
