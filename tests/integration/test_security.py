"""Issue 7, "Security", over real HTTP (uvicorn on 127.0.0.1, a tiny model): the API key on
every route (found by walking the app, the mounted UI included), sessions that cannot reach
each other, request fields that never become paths, and every request limit."""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from src.benchmarks.load import error_message_and_type
from src.chat.conversation import is_session_id
from src.chat.store import SessionStore
from src.config import load_settings
from src.stack import local_backend
from src.web.api import create_app
from tests.conftest import GREEDY, make_service, stack_around
from tests.live_server import LiveServer, read_sse

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

KEY = "k3y-for-tests-0123456789"
USER = {"role": "user", "content": "Hi"}


class Gate:
    """Holds generated tokens back: none pass while ``open`` is clear, and each waits
    ``delay`` seconds, so a test can keep replies running. ``cut_short`` counts the
    generations that were stopped before their end (a client that went away)."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()
        self.delay = 0.0
        self.cut_short = 0

    def wrap(self, engine) -> None:
        original = engine.generate

        def gated(prompt_ids, params, should_stop=lambda: False, constraint=None):
            tokens = original(prompt_ids, params, should_stop=should_stop, constraint=constraint)
            finished = False
            try:
                for token in tokens:
                    due = time.monotonic() + self.delay
                    while not self.open.is_set() or time.monotonic() < due:
                        if should_stop():
                            return
                        time.sleep(0.01)
                    yield token
                # The engine also ends a generation early when asked to stop (it may never
                # send a token): that was cut short too.
                finished = not should_stop()
            finally:
                tokens.close()
                if not finished:
                    self.cut_short += 1

        engine.generate = gated


def make_settings(tmp_path: Path, **overrides):
    values = {
        "data_dir": tmp_path / "data",
        "adapters_dir": tmp_path / "adapters",
        "max_message_chars": 2000,
        "max_body_bytes": 20_000,
    }
    return load_settings(_env_file=None, **{**values, **overrides})


def factory_for(tiny_llama_path: Path, gate: Gate | None = None):
    def factory(settings):
        service = make_service(
            tiny_llama_path,
            default_params=GREEDY.updated(max_new_tokens=4),
            store=SessionStore(settings.sessions_db),
            max_reply_tokens=settings.max_length,
            max_message_chars=settings.max_message_chars,
        )
        if gate is not None:
            gate.wrap(service.backend.engine)
        return stack_around(service, settings)

    return factory


def serve(tmp_path, tiny_llama_path, gate=None, mount_ui=False, **overrides) -> LiveServer:
    settings = make_settings(tmp_path, **overrides)
    app = create_app(settings, factory_for(tiny_llama_path, gate), mount_ui=mount_ui)
    return LiveServer(app)


@pytest.fixture()
def server(tmp_path, tiny_llama_path):
    with serve(tmp_path, tiny_llama_path) as live:
        yield live


@pytest.fixture()
def client(server):
    with server.client() as http:
        yield http


def assert_error(response: httpx.Response, status: int, error_type: str | None = None) -> dict:
    assert response.status_code == status, (response.request.url, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param"} and error["message"]
    if error_type is not None:
        assert error["type"] == error_type, error
    return error


def assert_protocol_error(
    response: httpx.Response, status: int, path: str, error_type: str
) -> None:
    """An error in the shape of the protocol ``path`` speaks (Anthropic's under /v1/messages,
    Ollama's under /api, the OpenAI shape elsewhere)."""
    if path.startswith("/api/"):
        assert response.status_code == status, response.text
        assert set(response.json()) == {"error"} and response.json()["error"], response.text
    elif path.startswith("/v1/messages"):
        assert response.status_code == status, response.text
        body = response.json()
        assert body["type"] == "error" and body["error"]["type"] == error_type, body
        assert body["error"]["message"]
    else:
        assert_error(response, status, error_type)


# ---- API key -----------------------------------------------------------------------------


def all_routes(routes) -> list[tuple[str, set[str] | None, object]]:
    """(path, methods, route) of every route, routers included (FastAPI >= 0.140 keeps
    included routers as one entry in ``app.routes``; ``iter_route_contexts`` opens them)."""
    try:
        from fastapi.routing import iter_route_contexts

        contexts = list(iter_route_contexts(routes))
    except ImportError:  # older FastAPI: app.routes is already flat
        contexts = list(routes)
    return [(c.path, c.methods, getattr(c, "route", c)) for c in contexts]


def concrete(path: str) -> str:
    """A path with each {parameter} filled in (a well-formed session id where one is asked)."""
    path = path.replace("{session_id}", "A" * 22)
    return re.sub(r"\{[^}]+\}", "x", path)


def basic(password: str, user: str = "anyone") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


WRONG_CREDENTIALS = [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Bearer {KEY}x"},
    {"Authorization": f"Bearer {KEY[:-1]}"},
    {"Authorization": KEY},  # no scheme
    {"Authorization": f"Token {KEY}"},
    {"X-API-Key": "wrong"},
    {"Authorization": basic("wrong")},
    {"Authorization": "Basic !!not-base64!!"},
    {"Authorization": "Basic " + base64.b64encode(KEY.encode()).decode()},  # no "user:"
    {"Cookie": f"api_key={KEY}"},
]
RIGHT_CREDENTIALS = [
    {"Authorization": f"Bearer {KEY}"},
    {"Authorization": f"bearer {KEY}"},
    {"X-API-Key": KEY},
    {"Authorization": basic(KEY)},
]
BODIES = {
    "/chat": {"message": "hi"},
    "/chat/stream": {"message": "hi"},
    "/v1/chat/completions": {"messages": [USER]},
    "/v1/messages": {"model": "any", "max_tokens": 4, "messages": [USER]},
    "/v1/messages/count_tokens": {"model": "any", "messages": [USER]},
    "/api/chat": {"model": "SERVED", "messages": [USER], "stream": False},
    "/api/generate": {"model": "SERVED", "prompt": "Hi", "stream": False},
    "/api/show": {"model": "SERVED"},  # Ollama's routes name the model
}


def test_every_route_and_the_ui_need_the_key_except_health(tmp_path, tiny_llama_path):
    with serve(tmp_path, tiny_llama_path, mount_ui=True, api_key=KEY) as live:
        app = live.app
        with live.client() as http:
            checked = set()
            mounts = []
            for path, methods, route in all_routes(app.routes):
                if methods is None:  # a mounted app (the UI): walked below
                    mounts.append((path, route))
                    continue
                for method in sorted(methods):
                    url = concrete(path)
                    checked.add((method, path))
                    if path == "/health":
                        assert http.request(method, url).status_code == 200
                        continue
                    for headers in WRONG_CREDENTIALS:
                        response = http.request(method, url, headers=headers)
                        assert response.status_code == 401, (method, path, headers)
                        if method != "HEAD":
                            assert_protocol_error(response, 401, path, "authentication_error")
                        assert response.headers["www-authenticate"]
                    for headers in RIGHT_CREDENTIALS:
                        body = BODIES.get(path)
                        if body is not None and body.get("model") == "SERVED":
                            body = {**body, "model": app.state.service.model_name}
                        response = http.request(method, url, json=body, headers=headers)
                        assert response.status_code != 401, (method, path, headers)
                        if body is not None:  # a real request: answered
                            assert response.status_code == 200, response.text
            # The walk found every route we serve (so it cannot silently walk nothing).
            assert checked >= {
                ("GET", "/health"),
                ("POST", "/chat"),
                ("POST", "/chat/stream"),
                ("GET", "/sessions"),
                ("GET", "/sessions/{session_id}"),
                ("PATCH", "/sessions/{session_id}"),
                ("DELETE", "/sessions/{session_id}"),
                ("POST", "/sessions/{session_id}/feedback"),
                ("GET", "/sessions/{session_id}/feedback"),
                ("POST", "/sessions/{session_id}/candidates"),
                ("GET", "/v1/models"),
                ("POST", "/v1/chat/completions"),
                ("POST", "/v1/messages"),
                ("POST", "/v1/messages/count_tokens"),
                ("POST", "/api/chat"),
                ("POST", "/api/generate"),
                ("GET", "/api/tags"),
                ("POST", "/api/show"),
                ("GET", "/api/ps"),
                ("GET", "/api/version"),
                ("GET", "/openapi.json"),
                ("GET", "/docs"),
                ("GET", "/redoc"),
            }
            # The UI: every one of Gradio's routes under /ui refuses a missing or wrong key.
            # It is built on its first request (with the key), and not by a refused one.
            assert [path for path, _ in mounts] == ["/ui"]
            assert http.get("/ui/").status_code == 401 and not app.state.ui.built
            assert http.get("/ui/", headers=RIGHT_CREDENTIALS[0]).status_code == 200
            ui_routes = all_routes(mounts[0][1].routes)
            assert len(ui_routes) > 20
            for path, methods, _route in ui_routes:
                for method in sorted(methods or {"GET"}):
                    url = "/ui" + concrete(path)
                    for headers in ({}, {"Authorization": basic("wrong")}):
                        response = http.request(method, url, headers=headers)
                        assert response.status_code == 401, (method, url, headers)
                        if method != "HEAD":
                            assert_error(response, 401, "authentication_error")
            # A browser is asked for the key as a password (HTTP Basic); API clients for a token.
            page = http.get("/ui/")
            assert page.headers["www-authenticate"].startswith("Basic ")
            assert "password" in page.json()["error"]["message"]
            assert http.get("/docs").headers["www-authenticate"].startswith("Basic ")
            assert http.get("/v1/models").headers["www-authenticate"] == "Bearer"
            for headers in RIGHT_CREDENTIALS:
                page = http.get("/ui/", headers=headers)
                assert page.status_code == 200 and "<html" in page.text.lower()
                assert http.get("/ui/config", headers=headers).status_code == 200
            # Even with the key, the UI serves no file a request names.
            for path in ("/ui/gradio_api/file=/etc/passwd", "/ui/gradio_api/file/etc/passwd"):
                response = http.get(path, headers=RIGHT_CREDENTIALS[0])
                assert response.status_code in (403, 404), (path, response.status_code)
                assert "root:" not in response.text
            # The key in a query string is not accepted (it would end up in logs).
            assert http.get(f"/v1/models?api_key={KEY}").status_code == 401


def test_the_key_is_refused_before_the_body_is_read(tmp_path, tiny_llama_path):
    with serve(tmp_path, tiny_llama_path, api_key=KEY) as live, live.client() as http:
        big = b"x" * 100_000  # over MAX_BODY_BYTES: an unauthenticated client gets 401, not 413
        response = http.post("/chat", content=big, headers={"content-type": "application/json"})
        assert_error(response, 401, "authentication_error")


def test_a_browser_uses_the_ui_with_the_key_as_its_password(tmp_path, tiny_llama_path):
    """Headless Chromium: /ui answers 401 until the browser has the key (as after its
    password prompt), then the whole UI, its queue and streamed reply included, works."""
    import shutil

    chromedriver = shutil.which("chromedriver")
    if chromedriver is None:
        pytest.skip("chromedriver not installed (make test installs chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    settings = {"api_key": KEY, "max_new_tokens": 6, "do_sample": False}
    try:
        with serve(tmp_path, tiny_llama_path, mount_ui=True, **settings) as live:
            driver.get(f"{live.url}/ui/")
            assert not driver.find_elements(By.CSS_SELECTOR, "#message textarea")
            # Credentials in the URL stand in for typing them into the browser's prompt; the
            # browser then keeps them for the page's own requests.
            driver.get(live.url.replace("http://", f"http://anyone:{KEY}@") + "/ui/")
            driver.get(f"{live.url}/ui/")
            deadline = time.monotonic() + 60
            while not driver.find_elements(By.CSS_SELECTOR, "#message textarea"):
                assert time.monotonic() < deadline, "the UI did not load"
                time.sleep(0.1)
            box = driver.find_element(By.CSS_SELECTOR, "#message textarea")
            box.send_keys("Hello")
            box.send_keys(Keys.ENTER)
            script = "return document.getElementById('status').innerText"
            while "tokens/s" not in driver.execute_script(script):
                assert time.monotonic() < deadline, "no reply in the UI"
                time.sleep(0.1)
    finally:
        driver.quit()


# ---- sessions ----------------------------------------------------------------------------


def test_one_session_id_cannot_read_change_or_delete_another(client):
    a = client.post("/chat", json={"message": "I am A"}).json()["session_id"]
    b = client.post("/chat", json={"message": "I am B"}).json()["session_id"]
    assert is_session_id(a) and is_session_id(b) and a != b
    before = {sid: client.get(f"/sessions/{sid}").json() for sid in (a, b)}
    forged = [
        a[:-1] + ("A" if a[-1] != "A" else "B"),  # one character off
        a.swapcase() if a.swapcase() != a else a[::-1],  # ids are case-sensitive
        b[:11] + a[11:],  # half of each
    ]
    for fake in forged:
        assert fake not in (a, b) and is_session_id(fake)
        assert_error(client.get(f"/sessions/{fake}"), 404, "not_found")
        assert_error(client.post("/chat", json={"message": "x", "session_id": fake}), 404)
        assert_error(client.post("/chat/stream", json={"message": "x", "session_id": fake}), 404)
        assert_error(client.delete(f"/sessions/{fake}"), 404)
    assert {sid: client.get(f"/sessions/{sid}").json() for sid in (a, b)} == before
    # An open server lists its sessions only to clients on its own machine: one reached over
    # the network (here through a local reverse proxy, which uvicorn trusts) gets 403.
    assert client.get("/sessions").status_code == 200
    remote = client.get("/sessions", headers={"X-Forwarded-For": "203.0.113.5"})
    assert_error(remote, 403, "forbidden")
    assert "API_KEY" in remote.json()["error"]["message"]
    assert (
        client.get(f"/sessions/{a}", headers={"X-Forwarded-For": "203.0.113.5"}).json()
        == (before[a])
    )


@pytest.mark.parametrize(
    "bad_id",
    [
        "made-up",
        "A" * 21,
        "A" * 23,
        "A" * 10_000,
        "' OR '1'='1",
        "%' OR 1=1 --",
        "é" * 22,
        "A" * 21 + "\x00",
        "A" * 21 + "\n",
        "..",
        "A" * 21 + "=",
        "a b",
    ],
)
def test_malformed_session_ids_are_a_clean_400(client, bad_id):
    a = client.post("/chat", json={"message": "keep me"}).json()["session_id"]
    before = client.get(f"/sessions/{a}").json()
    error = assert_error(client.post("/chat", json={"message": "x", "session_id": bad_id}), 400)
    assert error["param"] == "session_id" and "not a session id" in error["message"]
    assert bad_id not in error["message"]  # never echoed back
    for method in ("GET", "DELETE"):
        path = "/sessions/" + "".join(
            f"%{byte:02X}" if not (chr(byte).isalnum() or chr(byte) in "-_") else chr(byte)
            for byte in bad_id.encode()
        )
        response = client.request(method, path)
        assert response.status_code in (400, 404), (method, bad_id, response.status_code)
        assert_error(response, response.status_code)
    assert client.get(f"/sessions/{a}").json() == before


# ---- nothing a request names is loaded -------------------------------------------------------


def test_adapters_are_names_from_adapters_dir_never_paths(tmp_path, tiny_llama_path):
    adapters = tmp_path / "adapters"
    (adapters / "real").mkdir(parents=True)
    (adapters / "real" / "adapter_config.json").write_text("{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_text("{}")
    (adapters / "linked").symlink_to(outside, target_is_directory=True)
    with serve(tmp_path, tiny_llama_path) as live, live.client() as http:
        loaded = []
        live.app.state.adapters._load = lambda path: loaded.append(path)  # must never run
        names = [
            "../x",
            "../outside",
            "/etc/passwd",
            str(outside),
            "a/b",
            "real/",
            "real/../linked",
            "./real",
            "..",
            ".",
            "%2e%2e%2fx",
            "..%2Foutside",
            "..\\outside",
            "linked",  # a symlink inside ADAPTERS_DIR that points outside it
            "real\x00",
            "REAL",
        ]
        for name in names:
            for route in ("/chat", "/chat/stream"):
                response = http.post(route, json={"message": "hi", "adapter": name})
                error = assert_error(response, 400, "invalid_request_error")
                assert error["param"] == "adapter" and "available: real" in error["message"]
        assert loaded == []
        # No field of a request names a model, an adapter path or a file.
        for field in ("model", "model_name", "adapter_path", "model_path", "path"):
            response = http.post("/chat", json={"message": "hi", field: "/etc/passwd"})
            assert assert_error(response, 422)["param"] == field


def test_the_openai_model_field_is_only_a_name(client, monkeypatch):
    import src.models.loader
    import src.stack

    def never(*args, **kwargs):
        raise AssertionError("a request made the server load a model")

    for name in ("load_model", "load_from_folder", "resolve_model", "download_from_hub"):
        monkeypatch.setattr(src.models.loader, name, never)
    for name in ("build_chat_stack", "build_service", "build_local_backend"):
        monkeypatch.setattr(src.stack, name, never)
    served = client.get("/v1/models").json()["data"][0]["id"]
    for model in ("/etc/passwd", "../models/x", "microsoft/DialoGPT-medium", "", "x" * 500):
        request = {"model": model, "messages": [USER], "max_tokens": 2}
        response = client.post("/v1/chat/completions", json=request)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == served


# ---- limits --------------------------------------------------------------------------------


def test_message_and_system_prompt_length(client):
    # MAX_MESSAGE_CHARS=2000 in these settings, for every text a request sends.
    error = assert_error(client.post("/chat", json={"message": "x" * 2001}), 400)
    assert error["param"] == "message" and "MAX_MESSAGE_CHARS" in error["message"]
    too_long_system = {"message": "hi", "system_prompt": "s" * 2001}
    for route in ("/chat", "/chat/stream"):
        error = assert_error(client.post(route, json=too_long_system), 400)
        assert error["param"] == "system_prompt" and "MAX_MESSAGE_CHARS" in error["message"]
    for messages in (
        [{"role": "user", "content": "x" * 2001}],
        [{"role": "system", "content": "s" * 2001}, USER],
        [{"role": "user", "content": "x" * 2001}, {"role": "assistant", "content": "a"}, USER],
    ):
        error = assert_error(client.post("/v1/chat/completions", json={"messages": messages}), 400)
        assert error["param"] == "messages" and "MAX_MESSAGE_CHARS" in error["message"]
    ok = client.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 1})
    assert ok.status_code == 200


def test_a_full_session_is_refused_and_left_unchanged(tmp_path, tiny_llama_path):
    with serve(tmp_path, tiny_llama_path, max_history_messages=4) as live, live.client() as http:
        session = http.post("/chat", json={"message": "one"}).json()["session_id"]
        assert http.post("/chat", json={"message": "two", "session_id": session}).status_code == 200
        before = http.get(f"/sessions/{session}").json()
        assert len(before["messages"]) == 4
        for route in ("/chat", "/chat/stream"):
            response = http.post(route, json={"message": "three", "session_id": session})
            error = assert_error(response, 409, "session_full")
            assert error["param"] == "session_id"
            assert "MAX_HISTORY_MESSAGES" in error["message"] and "new session" in error["message"]
        assert http.get(f"/sessions/{session}").json() == before
        assert http.post("/chat", json={"message": "fresh start"}).status_code == 200


def test_openai_history_length(tmp_path, tiny_llama_path):
    turns = [USER, {"role": "assistant", "content": "Hello"}] * 2 + [USER]  # 5 messages
    with serve(tmp_path, tiny_llama_path, max_history_messages=4) as live, live.client() as http:
        error = assert_error(http.post("/v1/chat/completions", json={"messages": turns}), 400)
        assert error["param"] == "messages" and "MAX_HISTORY_MESSAGES" in error["message"]
        system = {"role": "system", "content": "Be brief."}  # not counted
        request = {"messages": [system, *turns[2:]], "max_tokens": 1}
        assert http.post("/v1/chat/completions", json=request).status_code == 200


def test_max_new_tokens_is_capped(tmp_path, tiny_llama_path):
    limits = {"max_length": 6, "max_new_tokens": 4}  # the default must fit MAX_LENGTH
    with serve(tmp_path, tiny_llama_path, **limits) as live, live.client() as http:
        for route in ("/chat", "/chat/stream"):
            error = assert_error(http.post(route, json={"message": "hi", "max_new_tokens": 7}), 400)
            assert error["param"] == "max_new_tokens"
            assert "over the limit of 6 (MAX_LENGTH" in error["message"]
        ok = http.post("/chat", json={"message": "hi", "max_new_tokens": 6})
        assert ok.status_code == 200
        for field in ("max_tokens", "max_completion_tokens"):
            request = {"messages": [USER], field: 7}
            error = assert_error(http.post("/v1/chat/completions", json=request), 400)
            assert error["param"] == field and "MAX_LENGTH" in error["message"]
            request[field] = 6
            assert http.post("/v1/chat/completions", json=request).status_code == 200


def test_body_size_on_every_post_route_with_and_without_content_length(client):
    for route, body in (
        ("/chat", {"message": "x" * 30_000}),
        ("/chat/stream", {"message": "x" * 30_000}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 30_000}]}),
    ):
        data = json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        declared = client.post(route, content=data, headers=headers)
        assert "MAX_BODY_BYTES" in assert_error(declared, 413, "request_too_large")["message"]

        def chunks(data=data):  # no Content-Length: counted as it arrives
            for start in range(0, len(data), 1000):
                yield data[start : start + 1000]

        chunked = client.post(route, content=chunks(), headers=headers)
        assert_error(chunked, 413, "request_too_large")
    # A body just under the limit is read (and then judged on its content).
    under = json.dumps({"message": "x" * 19_000}).encode()
    assert len(under) < 20_000
    response = client.post("/chat", content=under, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "message"


def wait_until(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_concurrent_streams_per_client(tmp_path, tiny_llama_path):
    gate = Gate()
    stream_body = {"message": "hi", "max_new_tokens": 4}
    openai_stream = {"messages": [USER], "stream": True, "max_tokens": 4}
    with serve(tmp_path, tiny_llama_path, gate=gate, max_streams_per_client=2) as live:
        slots = live.app.state.slots
        with live.client() as http, live.client() as other_http:
            gate.open.clear()  # replies now hold their slot until the gate opens
            with (
                http.stream("POST", "/chat/stream", json=stream_body) as first,
                http.stream("POST", "/v1/chat/completions", json=openai_stream) as second,
            ):
                assert first.status_code == second.status_code == 200
                assert slots.active("127.0.0.1") == 2
                # The third, streamed or not, on either API, is refused with 429.
                for route, body in (
                    ("/chat/stream", stream_body),
                    ("/chat", stream_body),
                    ("/v1/chat/completions", openai_stream),
                    ("/v1/chat/completions", {"messages": [USER]}),
                ):
                    response = other_http.post(route, json=body)
                    error = assert_error(response, 429, "rate_limit_exceeded")
                    assert "MAX_STREAMS_PER_CLIENT" in error["message"]
                    assert response.headers["retry-after"] == "1"
                # Another client (another address) is not affected.
                other = httpx.HTTPTransport(local_address="127.0.0.2")
                with httpx.Client(base_url=live.url, transport=other, timeout=60) as elsewhere:
                    gate.open.set()
                    assert elsewhere.post("/chat", json=stream_body).status_code == 200
                # A stream that ends gives its slot back.
                events = read_sse(first)
                assert events[-1][0] == "done"
                assert read_sse(second)[-1][1] == "[DONE]"
            wait_until(lambda: slots.active("127.0.0.1") == 0)
            assert http.post("/chat", json=stream_body).status_code == 200
            assert slots.active("127.0.0.1") == 0  # so does a reply that is not streamed


def test_a_client_that_disconnects_gives_its_slot_back(tmp_path, tiny_llama_path):
    gate = Gate()
    gate.delay = 0.3  # a slow reply: still running when the client leaves
    body = {"message": "hi", "max_new_tokens": 60}
    with serve(tmp_path, tiny_llama_path, gate=gate, max_streams_per_client=1) as live:
        slots = live.app.state.slots
        for number, (route, request) in enumerate(
            (
                ("/chat/stream", body),
                ("/v1/chat/completions", {"messages": [USER], "stream": True, "max_tokens": 60}),
            ),
            start=1,
        ):
            with live.client() as http, http.stream("POST", route, json=request) as response:
                assert response.status_code == 200
                assert slots.active("127.0.0.1") == 1
                assert_error(http.post("/chat", json=body), 429)
            # Leaving the block closed the connection mid-reply.
            wait_until(lambda: slots.active("127.0.0.1") == 0)
            wait_until(lambda number=number: gate.cut_short == number)  # it was cut short
        assert live.app.state.service.store.count() == 0  # the abandoned reply was not kept
        gate.delay = 0.0
        with live.client() as http:
            assert http.post("/chat", json={"message": "hi"}).status_code == 200
            # A refused request (bad input) takes no slot either.
            assert_error(http.post("/chat", json={"message": ""}), 400)
            assert slots.active("127.0.0.1") == 0


def test_a_client_that_hangs_up_on_a_plain_request_stops_it_and_nothing_is_saved(
    tmp_path, tiny_llama_path
):
    """Not streamed: the server watches the connection, so a client that gives up stops the
    generation, frees its slot and leaves its session as it was."""
    gate = Gate()
    gate.delay = 0.3  # a slow reply: still running when the client leaves
    requests = (
        ("/chat", {"message": "hi", "max_new_tokens": 60}),
        ("/v1/chat/completions", {"messages": [USER], "max_tokens": 60, "n": 2}),
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 60}),
    )
    with serve(tmp_path, tiny_llama_path, gate=gate, max_streams_per_client=1) as live:
        slots = live.app.state.slots
        cut_before = 0
        for route, body in requests:
            with live.client() as http, pytest.raises(httpx.ReadTimeout):
                http.post(route, json=body, timeout=1.0)
            wait_until(lambda: slots.active("127.0.0.1") == 0)
            wait_until(lambda before=cut_before: gate.cut_short > before)  # it was stopped
            cut_before = gate.cut_short
        assert live.app.state.service.store.count() == 0  # no exchange from /chat was kept


def test_a_bad_request_to_the_uis_event_stream_is_quiet(tmp_path, tiny_llama_path, caplog):
    """Gradio answers an unknown session in-band, then raises: no traceback per request (the
    logs cannot be flooded), and the stream ends properly."""
    with serve(tmp_path, tiny_llama_path, mount_ui=True) as live, live.client() as http:
        caplog.clear()
        for _ in range(3):
            with http.stream("GET", "/ui/gradio_api/queue/data?session_hash=x") as response:
                body = response.read().decode()
            assert response.status_code == 200 and '"session_not_found":true' in body
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_the_ui_is_built_once_by_its_first_requests(tmp_path, tiny_llama_path, monkeypatch):
    """Gradio is loaded when a browser first asks for /ui (src/web/lazy_ui.py): concurrent
    first requests build the page once, and every one of them gets it."""
    import src.web.ui

    built = []
    original = src.web.ui.build_chat_page
    monkeypatch.setattr(src.web.ui, "build_chat_page", lambda *a: built.append(1) or original(*a))
    with serve(tmp_path, tiny_llama_path, mount_ui=True) as live, live.client() as http:
        assert not live.app.state.ui.built and http.get("/health").status_code == 200
        statuses = []
        threads = [
            threading.Thread(target=lambda: statuses.append(http.get("/ui/").status_code))
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses == [200] * 4 and built == [1] and live.app.state.ui.built
        assert http.get("/ui/config").json()["title"] == "Mini-Claude"


def test_a_full_queue_answers_503_with_retry_after_at_once(tmp_path, tiny_llama_path):
    """MAX_QUEUED_REQUESTS: with the model busy (its forward pass held) and the queue full, a
    new request of any kind is refused at once instead of waiting; the queued ones are served
    once the model is free."""
    body = {"message": "hi", "max_new_tokens": 3}
    with serve(tmp_path, tiny_llama_path) as live:
        engine = live.app.state.service.backend.engine
        # As src/stack.py builds it from MAX_QUEUED_REQUESTS=2 and MAX_BATCH_SIZE=1.
        model, tokenizer = engine.model, live.app.state.service.backend.tokenizer
        settings = make_settings(tmp_path, max_queued_requests=2, max_batch_size=1)
        built = local_backend(model, tokenizer, settings, background=True).engine
        assert (built.max_waiting, built.max_batch_size) == (2, 1)
        built.close()
        engine.max_waiting, engine.max_batch_size = 2, 1
        entered, release = threading.Event(), threading.Event()
        forward = engine.model.forward

        def held_forward(*args, **kwargs):
            entered.set()
            release.wait(60)
            return forward(*args, **kwargs)

        statuses: list[int] = []

        def post() -> None:
            with live.client() as http:
                statuses.append(http.post("/chat", json=body).status_code)

        engine.model.forward = held_forward
        clients = [threading.Thread(target=post) for _ in range(3)]
        try:
            clients[0].start()
            assert entered.wait(20)  # the first is in the model; the next two wait in line
            for client in clients[1:]:
                client.start()
            wait_until(lambda: engine._waiting.qsize() == 2)
            with live.client() as http:
                for route, request in (
                    ("/chat", body),
                    ("/chat/stream", body),
                    ("/v1/chat/completions", {"messages": [USER], "stream": True}),
                    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
                ):
                    started = time.monotonic()
                    response = http.post(route, json=request)
                    assert time.monotonic() - started < 5
                    error = assert_error(response, 503, "server_busy")
                    assert "MAX_QUEUED_REQUESTS" in error["message"]
                    assert response.headers["retry-after"] == "1"
                # Anthropic's and Ollama's shapes say so too: the load test reads "busy".
                for route, request in (
                    ("/v1/messages", {"model": "any", "max_tokens": 2, "messages": [USER]}),
                    ("/api/chat", {"model": "tiny-llama0", "messages": [USER], "stream": False}),
                ):
                    response = http.post(route, json=request)
                    assert response.status_code == 503, response.text
                    assert response.headers["retry-after"] == "1"
                    message, error_type = error_message_and_type(response, response.json())
                    assert "MAX_QUEUED_REQUESTS" in message and error_type == "server_busy"
        finally:
            release.set()
            del engine.model.forward  # the class's own again
            for client in clients:
                client.join(60)
        assert statuses == [200, 200, 200]
        with live.client() as http:
            assert http.post("/chat", json=body).status_code == 200


def test_token_ids_must_be_integers_not_booleans(server):
    """JSON true is not token 1 (found by the fuzzer)."""
    with server.client() as http:
        assert_error(http.post("/detokenize", json={"tokens": [True]}), 422)
        assert_error(http.post("/v1/completions", json={"prompt": [1, True]}), 422)
        assert http.post("/detokenize", json={"tokens": [1, 2]}).status_code == 200
