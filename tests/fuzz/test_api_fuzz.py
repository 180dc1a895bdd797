"""Fuzz every operation of the API's own OpenAPI schema over real HTTP.

Schemathesis turns ``app.openapi()`` into Hypothesis strategies, for requests that match the
schema (positive mode) and requests that break it (negative mode: wrong types, missing or
unknown fields, ...); each is sent to a real uvicorn on 127.0.0.1 serving a tiny
random-weight Llama with the real SmolLM2 tokenizer, with a 96-token context window so that
every reply is short. Every response must:

- not be a 5xx, and a streamed reply must end with its final event, without an in-band error;
- use a status code, content type and body that the schema documents for it;
- for a request that breaks the schema, be a 4xx;
- for a 4xx, be ``{"error": {"message", "type", "param"}}`` with a non-empty message, and for
  bad input (400, 404, 422) name the field in ``param`` and in the message.

Three more sources of requests: in-range requests with arbitrary unicode, which must succeed
(the schema cannot express ranges, so most of its positive cases are rightly refused); bodies
JSON Schema cannot express (NaN, huge numbers, deep nesting, invalid UTF-8, lone surrogates,
oversized), sent every run; random junk bodies with random content types.

The number of examples is fixed (FUZZ_EXAMPLES changes it); the cases tried, with the status
codes they got, are printed at the end of the run (tests/fuzz/conftest.py).
"""

from __future__ import annotations

import json

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from src.chat.store import SessionStore
from src.config import Settings, load_settings
from src.web.anthropic_schemas import Message
from src.web.api import create_app
from src.web.openai_schemas import ChatCompletion
from src.web.schemas import ChatResponse
from tests.conftest import GREEDY, make_service, stack_around
from tests.fuzz.cases import count
from tests.fuzz.conftest import examples
from tests.live_server import LiveServer

# The schema does not depend on the settings: defaults, without reading the environment.
SPEC = create_app(Settings.model_construct(), mount_ui=False).openapi()
# Read whole event streams (the default stops after 20 events).
SCHEMA = schemathesis.openapi.from_dict(
    SPEC, config=schemathesis.Config.from_dict({"max-stream-events": 1000})
)
OPERATIONS = {result.ok().label: result.ok() for result in SCHEMA.get_all_operations()}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
EXAMPLES = examples(12)  # per test (an operation and a mode, a route, ...)
pytestmark = [pytest.mark.integration, pytest.mark.timeout(max(600, EXAMPLES * 3))]
# No shrinking: over HTTP on a small machine it can take minutes. A failure shows the
# request as it was sent instead.
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    database=None,
)
# A context window this small keeps every reply short: max_new_tokens + prompt <= 96.
CONTEXT_WINDOW = 96


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_llama_path):
    folder = tmp_path_factory.mktemp("fuzz-api")
    config = load_settings(
        _env_file=None,
        data_dir=folder / "data",
        adapters_dir=folder / "adapters",
        max_length=CONTEXT_WINDOW,  # the longest reply
        max_new_tokens=8,
        max_message_chars=2000,
        # Room for what the schema allows: OpenAI's request has fields of any JSON (audio,
        # prediction, ...), and a body cut off at 413 never reaches the validation under test.
        max_body_bytes=500_000,
    )

    def factory(settings):
        return stack_around(
            make_service(
                tiny_llama_path,
                context_window=CONTEXT_WINDOW,
                default_params=GREEDY.updated(max_new_tokens=8),
                max_reply_tokens=settings.max_length,
                store=SessionStore(settings.sessions_db),
                max_message_chars=settings.max_message_chars,
            ),
            settings,
        )

    with LiveServer(create_app(config, factory, mount_ui=False)) as server:
        yield server


@pytest.fixture(scope="module")
def http(live):
    with requests.Session() as session:
        yield session


def new_session(live, http) -> str:
    response = http.post(f"{live.url}/chat", json={"message": "Hello", "max_new_tokens": 4})
    assert response.status_code == 200, response.text
    return response.json()["session_id"]


@pytest.fixture(scope="module")
def session_id(live, http) -> str:
    """A real session, so that fuzzed requests reach existing sessions too, not only 404s."""
    return new_session(live, http)


ANTHROPIC_ERROR_TYPES = {
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "timeout_error",
}


def check_error_body(response, path: str) -> None:
    """A 4xx names the problem, in the error shape of the protocol the path speaks."""
    body = response.json()
    if path.startswith("/api/"):  # Ollama's shape: the message alone
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        assert body["error"].strip(), body
        return
    if path.startswith("/v1/messages"):  # Anthropic's shape: no param, the field leads
        assert set(body) == {"type", "error"} and body["type"] == "error", body
        error = body["error"]
        assert set(error) == {"type", "message"} and error["type"] in ANTHROPIC_ERROR_TYPES, body
        assert isinstance(error["message"], str) and error["message"].strip(), error
        return
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param"}, error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    if response.status_code in (400, 404, 422):
        # Bad input: the field is named, and the message starts with it.
        assert error["param"], error
        assert error["param"].split(".")[0] in error["message"], error


def check_stream(label: str, response) -> None:
    """A streamed 200 ends normally: no in-band error, then the final event."""
    events = parse_sse(response.text)  # requests has read the whole stream
    assert events, "empty stream"
    assert all(event != "error" and not data.startswith('{"error"') for event, data in events)
    if label.startswith("POST /v1/messages"):
        kinds = [json.loads(data)["type"] for _, data in events]
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
        assert [event for event, _ in events] == kinds  # each event named as its data says
    elif label == "POST /chat/stream":
        assert events[-1][0] == "done", events
        ChatResponse.model_validate_json(events[-1][1])
    else:
        assert events[-1][1] == "[DONE]", events
        kind = "text_completion" if label == "POST /v1/completions" else "chat.completion.chunk"
        for _, data in events[:-1]:
            assert json.loads(data)["object"] == kind, data


def parse_sse(text: str) -> list[tuple[str | None, str]]:
    """(event, data) pairs of a complete server-sent event stream."""
    events = []
    for block in text.split("\n\n"):
        lines = block.splitlines()
        event = next((line[6:].strip() for line in lines if line.startswith("event:")), None)
        data = [line[5:].strip() for line in lines if line.startswith("data:")]
        if data:
            events.append((event, "\n".join(data)))
    return events


def check_response(label: str, case, response) -> None:
    case.validate_response(response, checks=CHECKS)
    status = response.status_code
    if 400 <= status < 500:
        check_error_body(response, label.split(" ", 1)[1])
    elif status == 200 and "text/event-stream" in response.headers.get("content-type", [""])[0]:
        check_stream(label, response)


# Negative cases need something to break: operations without a body have only valid inputs
# (any string is a valid session id).
CASES = [
    pytest.param(label, mode, id=f"{label}-{mode.value}")
    for label, operation in OPERATIONS.items()
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or operation.body
]


@pytest.mark.parametrize(("label", "mode"), CASES)
def test_operation(label, mode, live, http, session_id):
    operation = OPERATIONS[label]
    strategy = operation.as_strategy(generation_mode=mode)
    if mode is GenerationMode.POSITIVE and "{session_id}" in operation.path:
        # Also a real session (DELETE gets its own), not only unknown or malformed ids.
        real = new_session(live, http) if operation.method == "delete" else session_id
        known = operation.as_strategy(generation_mode=mode, path_parameters={"session_id": real})
        strategy = st.one_of(strategy, known)

    @FUZZ_SETTINGS
    @given(case=strategy)
    def run(case) -> None:
        if (
            mode is GenerationMode.POSITIVE
            and label.startswith("POST /chat")
            and isinstance(case.body, dict)
            and case.body.get("session_id") is not None
        ):
            case.body["session_id"] = session_id
        note(f"Reproduce with: {case.as_curl_command(base_url=live.url)}")
        response = case.call(base_url=live.url, session=http, timeout=60)
        count("api", f"{label} [{mode.value}]", response.status_code)
        check_response(label, case, response)

    run()


# Valid requests built by hand: the schema cannot say which values are in range, so most of
# its positive cases are (rightly) refused with 400. These are all in range, with arbitrary
# unicode text (emoji, RTL, NUL and control characters), and must succeed, or fail only
# because the prompt does not fit the small context window.
TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40).filter(str.strip)
STOP = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8)
SAMPLING = {
    "temperature": st.just(0.0) | st.floats(0.0, 5.0),
    "top_p": st.floats(0.0, 1.0, exclude_min=True),
    "repetition_penalty": st.floats(0.05, 10.0),
    "seed": st.integers(0, 2**63 - 1),
    "stop": STOP | st.lists(STOP, max_size=4),
}
CHAT_BODIES = st.fixed_dictionaries(
    {"message": TEXT},
    optional={
        **SAMPLING,
        "system_prompt": TEXT,
        "max_new_tokens": st.integers(1, 24),
        "top_k": st.integers(0, 10_000),
        "do_sample": st.booleans(),
    },
)


@st.composite
def openai_bodies(draw) -> dict:
    turns = draw(st.integers(0, 2))
    messages = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    for _ in range(turns):
        messages += [{"role": r, "content": draw(TEXT)} for r in ("user", "assistant")]
    messages.append({"role": "user", "content": draw(TEXT)})
    optional = {
        **SAMPLING,
        "max_tokens": st.integers(1, 24),
        "top_k": st.just(-1) | st.integers(0, 10_000),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "model": st.text(max_size=10),
        "user": st.text(max_size=10),
    }
    return draw(st.fixed_dictionaries({"messages": st.just(messages)}, optional=optional))


def conversation(draw) -> list[dict]:
    """Alternating turns of arbitrary unicode, ending with the user's."""
    messages = []
    for _ in range(draw(st.integers(0, 2))):
        messages += [{"role": r, "content": draw(TEXT)} for r in ("user", "assistant")]
    return [*messages, {"role": "user", "content": draw(TEXT)}]


@st.composite
def anthropic_bodies(draw) -> dict:
    """In-range Messages API requests (Anthropic's), streamed or not."""
    optional = {
        "system": TEXT,
        "temperature": st.floats(0.0, 1.0),
        "top_p": st.floats(0.0, 1.0, exclude_min=True),
        "top_k": st.integers(1, 10_000),
        "stop_sequences": st.lists(STOP, max_size=4),
        "stream": st.booleans(),
    }
    required = {
        "model": st.text(min_size=1, max_size=10),
        "max_tokens": st.integers(1, 24),
        "messages": st.just(conversation(draw)),
    }
    return draw(st.fixed_dictionaries(required, optional=optional))


@st.composite
def ollama_bodies(draw, model: str) -> dict:
    """In-range /api/chat requests (Ollama's) for the served ``model``, streamed or not."""
    options = st.fixed_dictionaries(
        {},
        optional={
            "num_predict": st.integers(1, 24),
            "temperature": st.floats(0.0, 5.0),
            "top_k": st.integers(0, 10_000),
            "top_p": st.floats(0.0, 1.0),
            "seed": st.integers(0, 2**63 - 1),
            "stop": st.lists(STOP, max_size=4),
            "repeat_penalty": st.floats(0.05, 10.0),
        },
    )
    required = {"model": st.just(model), "messages": st.just(conversation(draw))}
    return draw(
        st.fixed_dictionaries(required, optional={"stream": st.booleans(), "options": options})
    )


def check_success(path: str, response) -> None:
    """200 with a body of the documented shape; or a prompt too long for the window."""
    if response.status_code == 400:
        body = response.json()
        if path.startswith("/api/"):  # Ollama's and Anthropic's shapes name no error type
            assert "context window" in body["error"], response.text
        elif path.startswith("/v1/messages"):
            assert "context window" in body["error"]["message"], response.text
        else:
            assert body["error"]["type"] == "context_length_exceeded", response.text
        return
    assert response.status_code == 200, response.text
    if path == "/api/chat":
        lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
        assert lines and all("error" not in line for line in lines), response.text
        assert lines[-1]["done"] is True and not any(line["done"] for line in lines[:-1])
        assert lines[-1]["done_reason"] in ("stop", "length"), lines[-1]
        return
    if path == "/v1/messages" and "text/event-stream" not in response.headers["content-type"]:
        Message.model_validate_json(response.text)
        return
    if "text/event-stream" not in response.headers["content-type"]:
        model = ChatCompletion if path.startswith("/v1") else ChatResponse
        model.model_validate_json(response.text)
        return
    check_stream(f"POST {path}", response)
    events = parse_sse(response.text)
    if path == "/chat/stream":
        deltas = "".join(json.loads(data)["text"] for event, data in events if event == "delta")
        assert deltas == json.loads(events[-1][1])["response"]


@pytest.mark.parametrize(
    ("path", "bodies"),
    [
        ("/chat", CHAT_BODIES),
        ("/chat/stream", CHAT_BODIES),
        ("/v1/chat/completions", openai_bodies()),
        ("/v1/messages", anthropic_bodies()),
        ("/api/chat", None),  # for the served model, named when the server is up
    ],
)
def test_valid_requests_succeed(path, bodies, live, http):
    if bodies is None:
        bodies = ollama_bodies(http.get(f"{live.url}/api/tags").json()["models"][0]["name"])

    @FUZZ_SETTINGS
    @given(body=bodies)
    def run(body: dict) -> None:
        note(f"POST {path} {json.dumps(body)}")
        response = http.post(f"{live.url}{path}", json=body, timeout=60)
        count("api", f"POST {path} [valid]", response.status_code)
        check_success(path, response)

    run()


# Bodies that JSON Schema cannot express or that once broke web servers; each is sent to
# every POST route, every run.
SPECIAL_BODIES = [
    b"",
    b"null",
    b"[]",
    b"{",
    b"\xff\xfe{}",
    b'"\xff"',  # not UTF-8
    b"[" * 15_000,  # nested too deep for the JSON parser
    b'{"message": "hi", "seed": 1' + b"0" * 5000 + b"}",  # too many digits for Python's int
    b'{"message": "' + b"x" * 30_000 + b'"}',  # over MAX_BODY_BYTES
    b'{"message": NaN}',
    b'{"message": "hi", "temperature": NaN}',
    b'{"message": "hi", "temperature": Infinity}',
    b'{"message": "hi", "top_p": -Infinity}',
    b'{"message": "hi", "repetition_penalty": 1e-320}',
    b'{"message": "hi", "max_new_tokens": 1e400}',
    b'{"message": "hi", "max_new_tokens": 100000000000000000000000000000}',
    b'{"message": "hi", "max_new_tokens": 5.5}',
    b'{"message": "hi", "seed": -1}',
    b'{"message": "hi", "seed": 99999999999999999999999999999999999}',
    b'{"message": "hi", "top_k": 1e308}',
    b'{"message": "\\u0000\\u202e\\ud83d\\ude00 hi"}',
    b'{"message": "\\ud800"}',
    b'{"message": "hi", "stop": ["\\udfff"]}',
    b'{"message": "hi", "system_prompt": "\\udfff"}',
    b'{"message": "hi", "session_id": "\\u0000"}',
    b'{"message": "hi", "adapter": "../../etc/passwd"}',
    b'{"message": "hi", "message": 1}',
    '{"message": "\U0001f600\u202e\u05e9\u05dc\u05d5\u05dd \u0000"}'.encode(),
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}',
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"messages": [{"role": "user", "content": "hi"}], "seed": 1e30}',
    b'{"messages": [{"role": "user", "content": "hi"}], "top_k": -2}',
    b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "stop": [1, 2]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "n": 1.5}',
    b'{"messages": [{"role": "user", "content": "\\ud800"}], "stream": true}',
    b'{"messages": [{"role": "system", "content": "x"}]}',
    b'{"messages": [{"role": "user", "content": null}]}',
    b'{"messages": {"role": "user"}}',
]
POST_PATHS = [label.split(" ", 1)[1] for label in OPERATIONS if label.startswith("POST ")]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=6,
)
JUNK_BODIES = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    st.dictionaries(
        st.sampled_from(["message", "messages", "temperature", "max_tokens", "stop", "seed"]),
        JSON_VALUES,
    ).map(lambda value: json.dumps(value).encode()),  # NaN and Infinity included
)
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=latin-1",
    "application/problem+json",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "",
]


def post_raw(live, http, path: str, body: bytes, content_type: str, name: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = http.post(f"{live.url}{path}", data=body, headers=headers, timeout=60)
    count("api", f"POST {path} [{name}]", response.status_code)
    try:
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            check_error_body(response, path)
        elif "text/event-stream" in response.headers["content-type"]:
            check_stream(f"POST {path}", response)
    except AssertionError as exc:
        exc.add_note(f"POST {path} content-type {content_type!r}: {body[:500]!r}")
        raise


@pytest.mark.parametrize("path", POST_PATHS)
def test_special_bodies(path, live, http):
    for body in SPECIAL_BODIES:
        post_raw(live, http, path, body, "application/json", "special bodies")


@pytest.mark.parametrize("path", POST_PATHS)
def test_junk_bodies(path, live, http):
    @FUZZ_SETTINGS
    @given(body=JUNK_BODIES, content_type=st.sampled_from(CONTENT_TYPES))
    def run(body: bytes, content_type: str) -> None:
        post_raw(live, http, path, body, content_type, "junk bodies")

    run()
