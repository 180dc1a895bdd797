import pytest

from src.web.ui_history import history_to_conversation, history_to_messages, text_of

pytestmark = pytest.mark.unit


def test_gradio_6_messages_with_strings_and_content_blocks():
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}, {"text": "!"}]},
    ]
    assert history_to_messages(history) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]


def test_legacy_pairs_and_objects_are_accepted():
    class Message:
        def __init__(self, role, content):
            self.role, self.content = role, content

    assert history_to_messages([("a", "b"), Message("user", "c"), Message("assistant", "d")]) == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]


def test_incomplete_and_out_of_order_turns_are_dropped():
    history = [
        {"role": "assistant", "content": "greeting before any user message"},
        {"role": "user", "content": "first"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "unanswered"},
    ]
    assert history_to_messages(history) == [
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "reply"},
    ]


def test_conversation_gets_the_system_prompt_or_none():
    assert history_to_conversation([], "").system_prompt is None
    assert history_to_conversation(None, "Be kind").system_prompt == "Be kind"
    assert text_of(None) == "" and text_of({"content": "x"}) == "x"
