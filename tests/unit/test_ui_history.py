import pytest

from src.web.ui_history import messages_to_history, text_of

pytestmark = pytest.mark.unit


def test_the_text_of_an_edited_message_in_any_of_gradios_shapes():
    assert text_of("Hello") == "Hello"
    assert text_of([{"type": "text", "text": "Hello"}, {"text": "!"}]) == "Hello!"
    assert text_of(None) == "" and text_of({"content": "x"}) == "x"


def test_history_is_plain_role_and_content():
    messages = [
        {"role": "user", "content": "Hi", "extra": 1},
        {"role": "assistant", "content": "Yo"},
    ]
    assert messages_to_history(messages) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
    ]
