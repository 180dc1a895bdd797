"""The web UI's JSON mode and token view, through the function the page calls, on the real
bundled model."""

import json

import pytest

from src.chat.adapter_pool import AdapterPool
from src.chat.deltas import TokenInfo
from src.chat.service import ChatService
from src.chat.store import SessionStore
from src.web.ui_context import Controls
from src.web.ui_replies import stream_reply
from src.web.ui_tokens import tokens_html

pytestmark = pytest.mark.unit


def test_tokens_are_escaped_shaded_and_explained():
    tokens = [
        TokenInfo("<b>", b"<b>", -0.01, (("<b>", b"<b>", -0.01), ("x", b"x", -5.0))),
        TokenInfo("\n", b"\n", -3.0),
    ]
    page = tokens_html(tokens)
    assert page.count('class="token"') == 2
    assert "&lt;b&gt;" in page and "<b>" not in page.split("</small>")[1]
    assert "99.0%" in page and "0.7%" in page  # the token's and an alternative's probability
    assert tokens_html([]) == ""


def test_json_mode_and_token_view_in_the_chat_page(bundled_service, tmp_path):
    store = SessionStore(tmp_path / "sessions.sqlite3")
    service = ChatService(bundled_service.backend, bundled_service.model_name, store=store)
    pool = AdapterPool(service, tmp_path, load=None)
    controls = Controls("", 0.0, 1.0, 120, 1.0, json_mode=True, show_tokens=True)
    updates = list(stream_reply(lambda: pool, None, None, "Describe a dog.", [], controls))
    history, _, status, token_view, session_id = updates[-1]
    reply = history[-1]["content"]
    assert isinstance(json.loads(reply), dict)
    assert token_view.count('class="token"') >= len(reply) // 12 and "tokens" in status
    assert store.get(session_id).messages == history  # saved to the session it started
    store.close()
