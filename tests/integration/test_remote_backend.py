"""BACKEND=remote against a second instance of our own API: a real uvicorn on 127.0.0.1
serving the bundled SmolLM2 (the "GPU box", guarded by an API key), a ChatService and a whole
API in front of it that load no model, and the errors of a server that is down or refuses."""

import json
import time

import httpx
import pytest
from openai import OpenAI

from src.benchmarks.processes import free_port
from src.config import GENERATION_FIELDS, load_settings
from src.errors import RemoteBackendError
from src.models.bundled import BUNDLED_MODEL_NAME
from src.params import GenerationParams
from src.stack import build_service
from src.web.api import create_app
from tests.conftest import bundled_settings
from tests.live_server import LiveServer, read_sse

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

UPSTREAM_KEY = "upstream-secret"
PARAMS = GenerationParams(do_sample=False, repetition_penalty=1.0, max_new_tokens=10)
SYSTEM = "You answer in one short sentence."
MESSAGES = ["What is the capital of France?", "And what is the capital of Italy?"]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, bundled_model_path):
    """The server that generates: our API on the bundled model, with an API key and no
    response cache (every request really runs the model)."""
    settings = bundled_settings(
        data_dir=tmp_path_factory.mktemp("upstream"),
        api_key=UPSTREAM_KEY,
        response_cache_size=0,
    )
    with LiveServer(create_app(settings, mount_ui=False)) as live:
        yield live


def remote_settings(upstream_url: str, tmp_path_factory, **overrides):
    values = {
        "_env_file": None,
        "backend": "remote",
        "remote_base_url": f"{upstream_url}/v1",
        "remote_api_key": UPSTREAM_KEY,
        "remote_timeout": 30,
        # A local model that does not exist: the remote backend must never try to load it.
        "model_name": "/nowhere/no-model",
        "model_fallback": "none",
        "data_dir": tmp_path_factory.mktemp("remote"),
        **PARAMS.model_dump(include=set(GENERATION_FIELDS) - {"stop"}, exclude_none=True),
    }
    return load_settings(**{**values, **overrides})


@pytest.fixture(scope="module")
def remote_service(upstream, tmp_path_factory):
    return build_service(remote_settings(upstream.url, tmp_path_factory))


@pytest.fixture(scope="module")
def proxy(upstream, tmp_path_factory):
    """A second API, BACKEND=remote, in front of the first (no API key of its own)."""
    app = create_app(remote_settings(upstream.url, tmp_path_factory), mount_ui=False)
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def expected(bundled_service):
    """The same conversation, greedy, on the bundled model run here."""
    conversation = bundled_service.new_conversation(SYSTEM)
    return [bundled_service.reply(conversation, message, PARAMS) for message in MESSAGES]


def wait_until_idle(engine, timeout: float = 10) -> int:
    """The upstream engine's decoded-row count once it stops changing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = engine.stats.rows_decoded
        time.sleep(0.5)
        if engine.stats.rows_decoded == before:
            return before
    raise AssertionError("the upstream engine never went idle")


def test_remote_service_replies_like_the_local_one_streams_and_keeps_history(
    remote_service, expected
):
    assert (
        remote_service.backend.kind == "remote" and remote_service.backend.context_window is None
    )  # no local model
    assert remote_service.model_name == BUNDLED_MODEL_NAME  # the server's first /v1/models id
    conversation = remote_service.new_conversation(SYSTEM)
    for message, local in zip(MESSAGES, expected, strict=True):
        stream = remote_service.start_reply(conversation, message, PARAMS)
        deltas = list(stream)
        result = stream.result
        assert result.text == local.text and "".join(deltas) == local.text
        assert len(deltas) > 2  # streamed token by token, not in one piece
        assert result.finish_reason == local.finish_reason
        # The server's usage: the same prompt (history included) and reply as run locally.
        assert (result.prompt_tokens, result.completion_tokens) == (
            local.prompt_tokens,
            local.completion_tokens,
        )
        assert not result.cached and result.first_token_seconds is not None
    assert [m["content"] for m in conversation.messages[1::2]] == [r.text for r in expected]
    again = remote_service.reply(remote_service.new_conversation(SYSTEM), MESSAGES[0], PARAMS)
    assert again.cached and again.text == expected[0].text  # greedy: cached on our side


def test_an_api_in_front_of_the_remote_serves_chat_sessions_and_the_openai_routes(proxy, expected):
    texts = [reply.text for reply in expected]
    with proxy.client() as http:
        assert http.get("/health").json() == {
            "status": "ok",
            "model": BUNDLED_MODEL_NAME,
            "backend": "remote",
            "context_window": None,  # the remote server's business
            "kv_cache_mb": None,
            "decoding": None,
            "detail": None,
        }
        first = http.post("/chat", json={"message": MESSAGES[0], "system_prompt": SYSTEM})
        assert first.status_code == 200, first.text
        session_id = first.json()["session_id"]
        with http.stream(
            "POST", "/chat/stream", json={"message": MESSAGES[1], "session_id": session_id}
        ) as response:
            events = read_sse(response)
        assert [event for event, _ in events].count("delta") > 2
        done = json.loads(events[-1][1])
        assert [first.json()["response"], done["response"]] == texts
        session = http.get(f"/sessions/{session_id}").json()  # kept in the proxy's store
        assert session["system_prompt"] == SYSTEM
        assert [m["content"] for m in session["messages"]] == [
            MESSAGES[0],
            texts[0],
            MESSAGES[1],
            texts[1],
        ]
        refused = http.post("/chat", json={"message": "Hi", "adapter": "chat"})
        assert refused.status_code == 400 and "BACKEND=remote" in refused.text

    client = OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0)
    assert [model.id for model in client.models.list()] == [BUNDLED_MODEL_NAME]
    request = {
        "model": BUNDLED_MODEL_NAME,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": MESSAGES[0]},
        ],
        "temperature": 0,
        "max_tokens": PARAMS.max_new_tokens,
    }
    chunks = list(client.chat.completions.create(**request, stream=True))
    streamed = [c.choices[0].delta.content for c in chunks if c.choices]
    streamed = [text for text in streamed if text]
    assert "".join(streamed) == texts[0] and len(streamed) > 2
    whole = client.chat.completions.create(**request)
    assert whole.choices[0].message.content == texts[0]
    assert whole.usage.prompt_tokens == expected[0].prompt_tokens  # the upstream's count


def test_cancelling_keeps_the_partial_reply_and_stops_the_remote_generation(
    remote_service, upstream, proxy
):
    engine = upstream.app.state.service.backend.engine
    conversation = remote_service.new_conversation()
    stream = remote_service.start_reply(
        conversation, "Write a long story about the sea.", PARAMS.updated(max_new_tokens=300)
    )
    received = []
    for delta in stream:
        received.append(delta)
        if len(received) == 2:
            stream.cancel()  # what Ctrl-C in the CLI and Stop in the UI do
    assert len(received) == 2  # nothing more after the cancel
    assert stream.result.finish_reason == "cancelled"
    assert conversation.messages[-1] == {"role": "assistant", "content": "".join(received)}
    rows = wait_until_idle(engine)

    # A client that leaves the proxy mid-stream: the proxy closes its upstream request too.
    with (
        proxy.client() as http,
        http.stream(
            "POST",
            "/chat/stream",
            json={"message": "Tell me a very long tale about dragons.", "max_new_tokens": 300},
        ) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data:") and json.loads(line[5:]).get("text"):
                break
    assert wait_until_idle(engine) - rows < 60  # stopped long before 300 tokens


def test_an_unreachable_server_is_a_clear_error_and_a_502(tmp_path_factory):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = remote_settings(url, tmp_path_factory, remote_model="some-model", remote_timeout=5)
    service = build_service(settings)  # REMOTE_MODEL set: no request yet
    conversation = service.new_conversation()
    with pytest.raises(RemoteBackendError) as error:
        service.start_reply(conversation, "Hi")  # before any text streams
    assert f"remote backend {url}/v1/chat/completions: cannot connect" in str(error.value)
    assert conversation.messages == []
    with pytest.raises(RemoteBackendError, match=f"{url}/v1/models: cannot connect"):
        build_service(remote_settings(url, tmp_path_factory))  # asks for the model

    with LiveServer(create_app(settings, mount_ui=False)) as live, live.client() as http:
        for path, body in [
            ("/chat", {"message": "Hi"}),
            ("/chat/stream", {"message": "Hi"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
            (
                "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "Hi"}], "stream": True},
            ),
        ]:
            response = http.post(path, json=body)
            assert response.status_code == 502, (path, response.text)
            error = response.json()["error"]
            assert error["type"] == "remote_backend_error"
            assert f"{url}/v1/chat/completions: cannot connect" in error["message"]


def test_a_wrong_remote_api_key_is_reported_with_the_servers_message(upstream, tmp_path_factory):
    settings = remote_settings(
        upstream.url, tmp_path_factory, remote_api_key="wrong", remote_model=BUNDLED_MODEL_NAME
    )
    service = build_service(settings)
    with pytest.raises(RemoteBackendError) as error:
        service.reply(service.new_conversation(), "Hi")
    assert f"{upstream.url}/v1/chat/completions: HTTP 401 Unauthorized" in str(error.value)
    assert "missing or wrong API key" in str(error.value)  # the upstream's own message

    with LiveServer(create_app(settings, mount_ui=False)) as live, live.client() as http:
        response = http.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}
        )
        assert response.status_code == 502
        assert (
            "HTTP 401 Unauthorized: missing or wrong API key" in response.json()["error"]["message"]
        )

    # Without REMOTE_MODEL the server is asked at start-up: /health reports the failure.
    unnamed = remote_settings(upstream.url, tmp_path_factory, remote_api_key="wrong")
    app = create_app(unnamed, mount_ui=False)
    with LiveServer(app, wait_until_ready=False) as live, live.client() as http:
        deadline = time.monotonic() + 30
        while (health := http.get("/health")).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert health.status_code == 503
        assert f"{upstream.url}/v1/models: HTTP 401" in health.json()["detail"]


def test_the_upstream_accepts_vllm_sampling_extras(upstream):
    """What the remote backend sends beyond OpenAI's fields, our server takes (top_k -1 = off)."""
    headers = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "top_k": -1,
        "repetition_penalty": 1.3,
    }
    response = httpx.post(
        f"{upstream.url}/v1/chat/completions", json=body, headers=headers, timeout=60
    )
    assert response.status_code == 200, response.text
    bad = httpx.post(
        f"{upstream.url}/v1/chat/completions",
        json={**body, "repetition_penalty": 0},
        headers=headers,
        timeout=60,
    )
    assert bad.status_code == 400 and "repetition_penalty" in bad.text


def test_tools_schemas_and_logprobs_pass_through_to_the_remote(proxy):
    """The API in front of the remote forwards tools, response_format and logprobs, and reads
    the remote's tool calls and log-probabilities back (the remote enforces the grammar)."""
    client = OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0)
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    called = client.chat.completions.create(
        model="m",
        messages=ask,
        tools=[weather],
        tool_choice="required",
        temperature=0,
        max_tokens=60,
        parallel_tool_calls=False,
    )
    call = called.choices[0].message.tool_calls[0]
    assert called.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"}
    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "blue"]}},
        "required": ["colour"],
        "additionalProperties": False,
    }
    shaped = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "A colour?"}],
        temperature=0,
        max_tokens=30,
        logprobs=True,
        top_logprobs=2,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    )
    choice = shaped.choices[0]
    assert json.loads(choice.message.content)["colour"] in ("red", "blue")
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)


def test_legacy_completions_and_the_tokenizer_routes_are_the_remotes(proxy, upstream):
    """Answered by the remote server itself, passed back unchanged (the model it names)."""
    request = {"prompt": "One, two, three,", "max_tokens": 4, "temperature": 0, "logprobs": 1}
    headers = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
    with proxy.client() as http, httpx.Client(base_url=upstream.url, headers=headers) as direct:
        via_proxy = http.post("/v1/completions", json={**request, "model": "anything"})
        expected = direct.post("/v1/completions", json=request)
        assert via_proxy.status_code == 200, via_proxy.text
        assert via_proxy.json()["choices"] == expected.json()["choices"]
        assert via_proxy.json()["model"] == BUNDLED_MODEL_NAME
        streamed = http.post("/v1/completions", json={**request, "stream": True})
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert streamed.text.rstrip().endswith("data: [DONE]")
        tokens = http.post("/tokenize", json={"prompt": "Hello world"}).json()
        assert tokens == direct.post("/tokenize", json={"prompt": "Hello world"}).json()
        text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()
        assert text == {"prompt": "Hello world"}
