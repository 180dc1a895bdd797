"""The CLI's session logic and input reader, on a tiny model, with real files."""

import io
import json

import pytest

from src.cli.commands import ChatSession, parse_value
from src.cli.reader import read_message
from tests.conftest import GREEDY

pytestmark = [pytest.mark.unit, pytest.mark.timeout(180)]


@pytest.fixture()
def session(tiny_llama_service):
    out, err = io.StringIO(), io.StringIO()
    chat = ChatSession(
        tiny_llama_service,
        params=GREEDY.updated(max_new_tokens=6),
        conversation=tiny_llama_service.new_conversation(),
        out=out,
        err=err,
    )
    return chat, out, err


def lines_reader(lines):
    feed = iter(lines)

    def read(_prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    return read


def test_reader_single_line_continuation_and_block():
    assert read_message(lines_reader(["hello"]), "", "") == "hello"
    assert read_message(lines_reader(["one \\", "two \\", "three"]), "", "") == "one \ntwo \nthree"
    assert read_message(lines_reader(['"""', "a", "", "b", '"""']), "", "") == "a\n\nb"
    with pytest.raises(EOFError):
        read_message(lines_reader([]), "", "")


def test_parse_value():
    assert parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("none") is None and parse_value("###") == "###"
    assert parse_value('["a", "b"]') == ["a", "b"]


def test_a_message_is_answered_and_kept(session):
    chat, out, _ = session
    assert chat.handle("Hello there")
    reply = out.getvalue().rstrip("\n")
    assert chat.conversation.messages == [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": reply},
    ]


def test_set_and_params(session):
    chat, _, err = session
    chat.handle("/set temperature 0.25")
    chat.handle("/set stop ###")
    assert chat.params.temperature == 0.25 and chat.params.stop == ("###",)
    chat.handle("/params")
    assert '"temperature": 0.25' in err.getvalue()


def test_set_rejects_bad_values_and_keeps_the_old_ones(session):
    chat, _, err = session
    chat.handle("/set temperature -2")
    chat.handle("/set tempreature 1")
    assert chat.params.temperature == GREEDY.temperature
    assert "temperature=-2" in err.getvalue() and "tempreature: unknown parameter" in err.getvalue()


def test_undo_retry_reset(session):
    chat, _out, err = session
    chat.handle("first")
    chat.handle("second")
    chat.handle("/undo")
    assert next(m["content"] for m in chat.conversation.messages) == "first"
    assert len(chat.conversation.messages) == 2
    chat.handle("/retry")
    assert len(chat.conversation.messages) == 2
    assert chat.conversation.messages[0]["content"] == "first"
    chat.handle("/reset")
    assert chat.conversation.messages == []
    chat.handle("/undo")
    assert "nothing to undo" in err.getvalue()


def test_system_prompt_command(session):
    chat, _, err = session
    chat.handle("/system You are terse.")
    assert chat.conversation.system_prompt == "You are terse."
    chat.handle("/system")
    assert "System prompt: You are terse." in err.getvalue()
    chat.handle("/system -")
    assert chat.conversation.system_prompt is None


def test_save_and_load(session, tmp_path):
    chat, _, _ = session
    chat.handle("/system Be nice.")
    chat.handle("remember me")
    chat.handle("/set temperature 0.3")
    path = tmp_path / "chat.json"
    chat.handle(f"/save {path}")
    saved = json.loads(path.read_text())
    assert saved["messages"][0]["content"] == "remember me"
    chat.handle("/reset")
    chat.handle("/set temperature 1.5")
    chat.handle(f"/load {path}")
    assert chat.conversation.system_prompt == "Be nice."
    assert chat.conversation.messages[0]["content"] == "remember me"
    assert chat.params.temperature == 0.3


def test_loading_a_bad_file_keeps_the_current_session(session, tmp_path):
    chat, _, err = session
    chat.handle("keep this")
    before = [dict(m) for m in chat.conversation.messages]
    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": [], "params": {"temperature": 99}}')
    chat.handle(f"/load {bad}")
    chat.handle(f"/load {tmp_path / 'missing.json'}")
    assert chat.conversation.messages == before
    assert "saved params are invalid" in err.getvalue() and "temperature=99" in err.getvalue()
    assert "no such file" in err.getvalue()


def test_unknown_command_help_and_quit(session):
    chat, _, err = session
    assert chat.handle("/frobnicate")
    assert "Unknown command /frobnicate" in err.getvalue()
    assert chat.handle("/help") and "/retry" in err.getvalue()
    assert chat.handle("/quit") is False


def test_errors_are_shown_not_raised(session):
    chat, _, err = session
    chat.handle("/set max_new_tokens 4000")
    chat.handle("hello")
    assert "Error: max_new_tokens=4000 leaves no room" in err.getvalue()
    assert chat.conversation.messages == []


def test_verbose_reports_speed_and_dropped_turns(tiny_llama_path):
    from tests.conftest import make_service

    service = make_service(tiny_llama_path, context_window=80)
    err = io.StringIO()
    chat = ChatSession(
        service,
        GREEDY.updated(max_new_tokens=8),
        service.new_conversation(),
        out=io.StringIO(),
        err=err,
        verbose=True,
    )
    for number in range(4):
        chat.handle(f"message number {number} with some words in it")
    assert "tokens/s" in err.getvalue()
    assert "oldest messages were left out" in err.getvalue()


def test_invalid_unicode_is_an_error_not_a_crash(session):
    chat, _, err = session
    assert chat.handle("bad byte \udcff here")
    assert "message: invalid Unicode" in err.getvalue()
    assert chat.conversation.messages == []


def test_a_failed_retry_keeps_the_exchange(session):
    chat, _, err = session
    chat.handle("keep me")
    before = [dict(m) for m in chat.conversation.messages]
    chat.handle("/set max_new_tokens 4000")
    chat.handle("/retry")
    assert "leaves no room" in err.getvalue()
    assert chat.conversation.messages == before
