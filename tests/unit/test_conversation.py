import json

import pytest

from src.chat.conversation import (
    Conversation,
    load_conversation_file,
    save_conversation_file,
)
from src.errors import ConversationFileError

pytestmark = pytest.mark.unit


def test_save_and_load_round_trip(tmp_path):
    conversation = Conversation(system_prompt="Be kind 🌸")
    conversation.add_exchange("Hi", "Hello!")
    path = tmp_path / "chats" / "one.json"
    save_conversation_file(path, conversation, {"temperature": 0.3})
    loaded, params = load_conversation_file(path)
    assert loaded.to_dict() == conversation.to_dict()
    assert params == {"temperature": 0.3}
    assert not list(path.parent.glob("*.tmp"))  # the temporary file was renamed


def test_ids_are_unguessable_and_distinct():
    ids = {Conversation().id for _ in range(100)}
    assert len(ids) == 100 and all(len(i) >= 20 for i in ids)


def test_pop_exchange():
    conversation = Conversation()
    assert conversation.pop_exchange() is None
    conversation.add_exchange("a", "b")
    assert conversation.pop_exchange() == ("a", "b") and conversation.messages == []


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"messages": "hi"}', "'messages' must be a list"),
        ('{"messages": [{"role": "assistant", "content": "x"}, {}]}', "message 0 has role"),
        ('{"messages": [{"role": "user", "content": 3}]}', "message 0 must be an object"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "last user message has no reply"),
        ('{"system_prompt": 5, "messages": []}', "'system_prompt' must be a string"),
        ('{"messages": [], "params": [1]}', "'params' must be an object"),
    ],
)
def test_malformed_files_are_rejected_with_the_file_and_the_problem(tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConversationFileError) as error:
        load_conversation_file(path)
    assert str(path) in str(error.value)
    assert expected in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConversationFileError, match="no such file"):
        load_conversation_file(tmp_path / "nope.json")


def test_a_failed_save_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "chat.json"
    save_conversation_file(path, Conversation(system_prompt="first"), {})
    before = path.read_text()

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        save_conversation_file(path, Conversation(), {"bad": Unserialisable()})
    assert path.read_text() == before
    assert not list(tmp_path.glob("*.tmp"))  # the half-written temporary file is gone
    with pytest.raises(ConversationFileError, match="invalid Unicode"):
        save_conversation_file(path, Conversation(system_prompt="\ud800"), {})
    assert path.read_text() == before
    assert json.loads(before)["system_prompt"] == "first"
