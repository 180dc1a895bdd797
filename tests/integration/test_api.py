"""The FastAPI server over real HTTP (uvicorn on 127.0.0.1), on a tiny model with the real
SmolLM2 tokenizer and chat template, with sessions in a real SQLite file."""

import json
import sqlite3
import threading
import time

import pytest

from src.benchmarks.load import error_message_and_type
from src.chat.store import SessionStore
from src.config import load_settings
from src.errors import ModelLoadingError
from src.web.api import create_app
from tests.conftest import GREEDY, make_service, stack_around
from tests.live_server import LiveServer, read_sse

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture()
def settings(tmp_path):
    return load_settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        adapters_dir=tmp_path / "adapters",  # never the repository's outputs/
        max_message_chars=2000,
        max_body_bytes=20_000,
    )


def tiny_factory(tiny_llama_path):
    def factory(settings):
        return stack_around(
            make_service(
                tiny_llama_path,
                default_params=GREEDY.updated(max_new_tokens=8),
                store=SessionStore(settings.sessions_db),
                max_reply_tokens=settings.max_length,
                max_message_chars=settings.max_message_chars,
            ),
            settings,
        )

    return factory


def wait_for_health(http, status: str, timeout: float = 30) -> dict:
    """Poll /health until it reports ``status``; return its body."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = http.get("/health").json()
        if body["status"] == status:
            return body
        time.sleep(0.05)
    raise AssertionError(f"/health never said {status!r}")


@pytest.fixture()
def server(settings, tiny_llama_path):
    app = create_app(settings, tiny_factory(tiny_llama_path), mount_ui=False)
    with LiveServer(app) as live:
        yield live


@pytest.fixture()
def client(server):
    with server.client() as http:
        yield http


def test_health_is_503_while_loading_then_200_with_the_model(settings, tiny_llama_path):
    release = threading.Event()
    factory = tiny_factory(tiny_llama_path)

    def slow_factory(settings):
        release.wait(30)
        return factory(settings)

    app = create_app(settings, slow_factory, mount_ui=False)
    with LiveServer(app, wait_until_ready=False) as live, live.client() as http:
        loading = http.get("/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        busy = http.post("/chat", json={"message": "hi"})
        assert busy.status_code == 503 and "still loading" in busy.json()["error"]["message"]
        # The load test counts this answer as part of a restart in every protocol's shape
        # (Anthropic's calls every 503 "overloaded_error", Ollama's names no type).
        hi = [{"role": "user", "content": "hi"}]
        for route, request in (
            ("/v1/chat/completions", {"messages": hi}),
            ("/v1/messages", {"model": "any", "max_tokens": 4, "messages": hi}),
            ("/api/chat", {"model": "tiny-llama0", "messages": hi, "stream": False}),
        ):
            response = http.post(route, json=request)
            assert response.status_code == 503, route
            message, error_type = error_message_and_type(response, response.json())
            assert "still loading" in message and error_type == "service_unavailable", route
        release.set()
        ready = wait_for_health(http, "ok")
        assert ready == {
            "status": "ok",
            "model": "tiny-llama0",
            "backend": "local",
            "context_window": 256,  # the tiny model's max_position_embeddings
            "kv_cache_mb": round(256 * 2 * 2 * 2 * 8 * 4 / 2**20, 1),
            "decoding": {
                "steps": 0,
                "rows_decoded": 0,
                "prefill_passes": 0,
                "rows_prefilled": 0,
                "prefill_chunks": 0,
                "drafted": 0,  # prompt lookup is off by default
                "accepted": 0,
            },
            "detail": None,
        }
        reply = http.post("/chat", json={"message": "hi", "max_new_tokens": 5}).json()
        decoding = http.get("/health").json()["decoding"]
        assert decoding["rows_prefilled"] == 1  # the prompt, then one step per further token
        assert decoding["rows_decoded"] == reply["usage"]["completion_tokens"] - 1


def test_a_model_that_fails_to_load_is_reported(settings):
    def failing_factory(settings):
        raise ModelLoadingError("Model folder /nowhere does not exist.")

    app = create_app(settings, failing_factory, mount_ui=False)
    with LiveServer(app, wait_until_ready=False) as live, live.client() as http:
        health = wait_for_health(http, "error")
        assert health["detail"] == "Model folder /nowhere does not exist."
        chat = http.post("/chat", json={"message": "hi"})
        assert chat.status_code == 503 and "/nowhere" in chat.json()["error"]["message"]


def test_chat_starts_and_continues_a_session(client):
    first = client.post("/chat", json={"message": "Hello", "system_prompt": "Be brief."})
    assert first.status_code == 200
    body = first.json()
    assert set(body) >= {"response", "session_id", "usage", "timing", "finish_reason"}
    assert body["usage"]["completion_tokens"] >= 1
    assert body["usage"]["total_tokens"] == (
        body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )
    session_id = body["session_id"]
    second = client.post("/chat", json={"message": "And then?", "session_id": session_id})
    assert second.status_code == 200 and second.json()["session_id"] == session_id
    assert second.json()["usage"]["prompt_tokens"] > body["usage"]["prompt_tokens"]
    history = client.get(f"/sessions/{session_id}").json()
    assert history["system_prompt"] == "Be brief."
    assert [m["content"] for m in history["messages"]] == [
        "Hello",
        body["response"],
        "And then?",
        second.json()["response"],
    ]


def test_stream_sends_deltas_then_the_full_response(client):
    with client.stream("POST", "/chat/stream", json={"message": "Hi", "max_new_tokens": 6}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = read_sse(r)
    deltas = [json.loads(data)["text"] for event, data in events if event == "delta"]
    kinds = [event for event, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"delta"}
    done = json.loads(events[-1][1])
    assert "".join(deltas) == done["response"]
    stored = client.get(f"/sessions/{done['session_id']}").json()["messages"]
    assert stored[-1]["content"] == done["response"]


def test_sessions_are_separate_and_can_be_deleted(client):
    a = client.post("/chat", json={"message": "I am session A"}).json()["session_id"]
    b = client.post("/chat", json={"message": "I am session B"}).json()["session_id"]
    assert a != b and len(a) >= 20
    assert client.get(f"/sessions/{a}").json()["messages"][0]["content"] == "I am session A"
    assert client.get(f"/sessions/{b}").json()["messages"][0]["content"] == "I am session B"
    assert client.delete(f"/sessions/{a}").status_code == 204
    assert client.get(f"/sessions/{a}").status_code == 404
    assert client.delete(f"/sessions/{a}").status_code == 404
    assert client.get(f"/sessions/{b}").status_code == 200


def test_unknown_session_is_404_and_creates_nothing(client, settings):
    unknown = "Unknown-session-id_123"  # the form of an id (22 characters), but no session
    response = client.post("/chat", json={"message": "hi", "session_id": unknown})
    assert response.status_code == 404
    assert response.json()["error"] == {
        "message": f"session_id: no session {unknown!r}",
        "type": "not_found",
        "param": "session_id",
    }
    assert client.get(f"/sessions/{unknown}").status_code == 404
    # Not even the form of an id: 400 (tests/integration/test_security.py has more).
    assert client.post("/chat", json={"message": "hi", "session_id": "made-up"}).status_code == 400


@pytest.mark.parametrize(
    ("payload", "status", "param", "text"),
    [
        ({"message": ""}, 400, "message", "must not be empty"),
        ({"message": "x" * 2001}, 400, "message", "over the limit of 2000"),
        ({"message": "hi", "temprature": 0.5}, 422, "temprature", "unknown parameter"),
        ({"message": "hi", "temperature": -1}, 400, "temperature", "greater than or equal to 0"),
        ({"message": "hi", "top_p": 2}, 400, "top_p", "less than or equal to 1"),
        ({"message": "hi", "max_new_tokens": 0}, 400, "max_new_tokens", "at least 1 token"),
        ({"message": "hi", "max_new_tokens": "many"}, 422, "max_new_tokens", "valid integer"),
        ({"message": "hi", "stop": [""]}, 400, "stop", "must not be empty"),
        ({"message": 42}, 422, "message", "valid string"),
        ({}, 422, "message", "Field required"),
        ({"message": "word " * 300, "max_new_tokens": 200}, 400, "message", "prompt tokens"),
    ],
)
def test_bad_requests_name_the_field(client, payload, status, param, text):
    for route in ("/chat", "/chat/stream"):
        response = client.post(route, json=payload)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["param"] == param and text in error["message"], error


def test_malformed_json_and_oversized_bodies(client):
    bad = client.post("/chat", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 422 and "malformed JSON" in bad.json()["error"]["message"]
    big = json.dumps({"message": "x" * 30_000}).encode()
    declared = client.post("/chat", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "MAX_BODY_BYTES" in declared.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    chunked = client.post("/chat", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413


def test_a_failed_request_changes_no_stored_session(client, settings):
    session_id = client.post("/chat", json={"message": "keep me"}).json()["session_id"]
    before = client.get(f"/sessions/{session_id}").json()
    for payload in (
        {"message": "", "session_id": session_id},
        {"message": "hi", "session_id": session_id, "temperature": 9},
        {"message": "word " * 300, "session_id": session_id, "max_new_tokens": 200},
        {"message": "hi", "session_id": session_id, "system_prompt": "new"},
    ):
        assert client.post("/chat", json=payload).status_code == 400
    assert client.get(f"/sessions/{session_id}").json() == before
    with sqlite3.connect(settings.sessions_db) as db:
        assert db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 1


def test_sessions_survive_a_restart(settings, tiny_llama_path):
    factory = tiny_factory(tiny_llama_path)
    with LiveServer(create_app(settings, factory, mount_ui=False)) as live, live.client() as http:
        reply = http.post("/chat", json={"message": "Remember this"}).json()
    with LiveServer(create_app(settings, factory, mount_ui=False)) as live, live.client() as http:
        messages = http.get(f"/sessions/{reply['session_id']}").json()["messages"]
    assert messages == [
        {"role": "user", "content": "Remember this"},
        {"role": "assistant", "content": reply["response"]},
    ]
    with sqlite3.connect(settings.sessions_db) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_api_key_guards_every_route_but_health(settings, tiny_llama_path):
    guarded = settings.model_copy(update={"api_key": load_settings(api_key="s3cret").api_key})
    app = create_app(guarded, tiny_factory(tiny_llama_path), mount_ui=False)
    with LiveServer(app) as live, live.client() as http:
        assert http.get("/health").status_code == 200
        routes = [
            ("POST", "/chat", {"message": "hi"}),
            ("POST", "/chat/stream", {"message": "hi"}),
            ("GET", "/sessions/x", None),
            ("DELETE", "/sessions/x", None),
            ("GET", "/v1/models", None),
            ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ]
        for method, path, body in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                response = http.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
        ok = http.post("/chat", json={"message": "hi"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        models = http.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert models.status_code == 200


def test_cors_origins_are_configurable(settings, tiny_llama_path):
    allowed = settings.model_copy(update={"cors_origins": "http://localhost:3000"})
    app = create_app(allowed, tiny_factory(tiny_llama_path), mount_ui=False)
    with LiveServer(app) as live, live.client() as http:
        preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
        response = http.options("/chat", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = http.options("/chat", headers={**preflight, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_openai_routes_non_streaming_and_streaming(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-llama0"
    request = {
        "model": "anything",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "More"},
        ],
        "max_tokens": 5,
        "temperature": 0,
    }
    completion = client.post("/v1/chat/completions", json=request).json()
    assert completion["object"] == "chat.completion"
    choice = completion["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert completion["usage"]["completion_tokens"] == 5
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={**request, "stream": True, "stream_options": {"include_usage": True}},
    ) as response:
        events = read_sse(response)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == choice["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize(
    ("payload", "status", "text"),
    [
        ({"messages": []}, 422, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, 400, "besides the system prompt"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is this?"},
                            {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                        ],
                    }
                ]
            },
            400,
            "messages[0].content[1]: a 'image_url' part cannot be read: this model reads text only",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}], "n": 99},
            400,
            "n: 99 choices is over the limit of 8 (MAX_CHOICES)",
        ),
        ({"messages": [{"role": "user", "content": "a"}], "n": 0}, 422, "n"),
        (
            {"messages": [{"role": "user", "content": "a"}], "logit_bias": {"abc": 1}},
            400,
            "'abc' is not a token id",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}], "logit_bias": {"9999999": 1}},
            400,
            "not in the vocabulary",
        ),
        ({"messages": [{"role": "user", "content": "a"}], "temprature": 0.5}, 422, "temprature"),
        ({"messages": [{"role": "user", "content": "a"}], "temperature": 7}, 400, "temperature"),
        (
            {"messages": [{"role": "user", "content": "a"}], "presence_penalty": 3},
            400,
            "presence_penalty",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 3},
            400,
            "needs logprobs set to true",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": 21},
            400,
            "top_logprobs",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}], "tool_choice": "required"},
            400,
            "'required' needs tools",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "4"}]},
            400,
            "a tool message needs tool_call_id",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{oops"},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "c1", "content": "4"},
                ]
            },
            400,
            "arguments of a tool call are not valid JSON",
        ),
        (
            {
                "messages": [{"role": "user", "content": "a"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}},
                },
            },
            400,
            "not",
        ),
        (
            {
                "messages": [{"role": "user", "content": "a"}],
                "response_format": {"type": "json_schema"},
            },
            400,
            "needs json_schema.schema",
        ),
    ],
)
def test_openai_bad_requests(client, payload, status, text):
    response = client.post("/v1/chat/completions", json=payload)
    assert response.status_code == status, response.text
    assert text in response.json()["error"]["message"]


def test_unknown_route_uses_the_error_shape(client):
    response = client.get("/nope")
    assert response.status_code == 404 and response.json()["error"]["type"] == "http_error"


def test_openapi_schema_lists_every_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) >= {
        "/health",
        "/chat",
        "/chat/stream",
        "/sessions/{session_id}",
        "/v1/chat/completions",
        "/v1/models",
    }


def test_chat_with_a_lora_adapter_chosen_by_name(settings, tiny_llama_path, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    # init_lora_weights=False: random A and B, so the adapter visibly changes the output.
    config = LoraConfig(
        r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(base_model, config).save_pretrained(settings.adapters_dir / "random-lora")
    settings = settings.model_copy(
        update={"model_name": str(tiny_llama_path), "model_cache_dir": tmp_path / "cache"}
    )
    app = create_app(settings, tiny_factory(tiny_llama_path), mount_ui=False)
    request = {
        "message": "Hello",
        "do_sample": False,
        "repetition_penalty": 1.0,
        "max_new_tokens": 8,
    }
    with LiveServer(app) as live, live.client() as http:
        base = http.post("/chat", json=request)
        adapted = http.post("/chat", json={**request, "adapter": "random-lora"})
        assert base.status_code == adapted.status_code == 200, adapted.text
        assert adapted.json()["response"] != base.json()["response"]
        for name in ("../random-lora", "/etc/passwd", "unknown"):
            refused = http.post("/chat", json={**request, "adapter": name})
            assert refused.status_code == 400
            assert refused.json()["error"]["param"] == "adapter"
            assert "available: random-lora" in refused.json()["error"]["message"]


def test_invalid_unicode_is_a_400_not_a_500(client):
    body = b'{"message": "bad \\ud800 text"}'
    response = client.post("/chat", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "message"
    openai_body = b'{"messages": [{"role": "user", "content": "\\udc80"}]}'
    response = client.post(
        "/v1/chat/completions", content=openai_body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "invalid Unicode" in response.json()["error"]["message"]


NATIVE = {"message": "hi", "max_new_tokens": 2}
OPENAI_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
LEGACY = {"prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize(
    ("route", "body", "field", "value"),
    [
        ("/chat", NATIVE, "presence_penalty", True),
        ("/chat", NATIVE, "max_new_tokens", "5"),
        ("/chat", NATIVE, "do_sample", 0),
        ("/v1/chat/completions", OPENAI_CHAT, "top_p", True),
        ("/v1/chat/completions", OPENAI_CHAT, "n", 1.0),
        ("/v1/chat/completions", OPENAI_CHAT, "stream", 1),
        ("/v1/completions", LEGACY, "temperature", False),
        ("/v1/completions", LEGACY, "prompt", [True, 2]),
    ],
)
def test_values_of_the_wrong_json_type_are_refused(client, route, body, field, value):
    """As OpenAI's API does: true is not the number 1, "5" is not 5, 1.0 is not the integer 1."""
    response = client.post(route, json={**body, field: value})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert field in response.json()["error"]["message"]
    assert client.post(route, json=body).status_code == 200  # the rest of the request is fine


def test_an_unexpected_load_failure_is_reported_not_loading_forever(settings):
    def broken_factory(settings):
        raise PermissionError("cannot write data/sessions.sqlite3")

    app = create_app(settings, broken_factory, mount_ui=False)
    with LiveServer(app, wait_until_ready=False) as live, live.client() as http:
        health = wait_for_health(http, "error")
        assert health["detail"] == "PermissionError: cannot write data/sessions.sqlite3"


def test_native_chat_takes_response_format_and_logprobs(client):
    schema = {
        "type": "object",
        "properties": {
            "mood": {"enum": ["happy", "sad"]},
            "level": {"type": "integer", "minimum": 1, "maximum": 9},
        },
        "required": ["mood", "level"],
        "additionalProperties": False,
    }
    body = {
        "message": "How do you feel?",
        "do_sample": False,
        "max_new_tokens": 60,
        "logprobs": True,
        "top_logprobs": 2,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "mood", "schema": schema},
        },
    }
    reply = client.post("/chat", json=body).json()
    assert set(json.loads(reply["response"])) == {"mood", "level"}
    assert "".join(t["token"] for t in reply["logprobs"]) == reply["response"]
    assert all(len(t["top_logprobs"]) == 2 for t in reply["logprobs"])
    with client.stream("POST", "/chat/stream", json=body) as response:
        events = read_sse(response)
    deltas = [json.loads(data) for event, data in events if event == "delta"]
    assert "".join(d["text"] for d in deltas) == reply["response"]
    assert [t["token"] for d in deltas for t in d["logprobs"]] == [
        t["token"] for t in reply["logprobs"]
    ]
    bad = client.post("/chat", json={**body, "response_format": {"type": "json_schema"}})
    assert bad.status_code == 400 and "needs json_schema.schema" in bad.json()["error"]["message"]
