"""The remote backend's wire format: the request it sends, the server-sent events it reads, and
the errors it reports, against httpx's in-memory transport (shapes that vLLM and TGI send and
our own server never does). The real thing, against a second instance of our API on
127.0.0.1, is tests/integration/test_remote_backend.py."""

import json

import httpx
import pytest

from src.chat.conversation import Conversation
from src.chat.remote import RemoteBackend
from src.chat.service import ChatService
from src.config import load_settings
from src.errors import ConfigError, RemoteBackendError
from src.params import GenerationParams
from src.stack import build_service
from tests.conftest import GREEDY

pytestmark = pytest.mark.unit

BASE = "http://gpu-box:8000/v1"


class RecordingStream(httpx.SyncByteStream):
    """A response body served line by line, which records whether the client closed it."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.sent = 0
        self.closed = False

    def __iter__(self):
        for line in self.lines:
            self.sent += 1
            yield line.encode()

    def close(self) -> None:
        self.closed = True


def sse(*chunks: object) -> list[str]:
    return [f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks]


def delta(text: str | None = None, finish: str | None = None) -> dict:
    content = {} if text is None else {"content": text}
    return {"choices": [{"index": 0, "delta": content, "finish_reason": finish}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
REPLY = sse(delta(""), delta("Hello"), delta(" there"), delta("!"), delta(None, "stop"), USAGE)


class Server:
    """An in-memory OpenAI-compatible server: records requests, answers with ``respond``."""

    def __init__(
        self, lines: list[str] | None = None, done: bool = True, status: int = 200, **kwargs
    ) -> None:
        self.requests: list[httpx.Request] = []
        lines = lines if lines is not None else REPLY
        self.stream = RecordingStream(lines + (sse("[DONE]") if done else []))
        self.status = status
        self.kwargs = kwargs  # answer with httpx.Response(status, **kwargs) instead of a stream

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": "served-model"}]})
        if self.status != 200 or self.kwargs:
            return httpx.Response(self.status, **self.kwargs)
        headers = {"content-type": "text/event-stream; charset=utf-8"}
        return httpx.Response(200, headers=headers, stream=self.stream)

    def backend(self, **kwargs) -> RemoteBackend:
        kwargs.setdefault("model", "m")
        return RemoteBackend(BASE, transport=httpx.MockTransport(self), **kwargs)


def service_on(server: Server, **kwargs) -> ChatService:
    return ChatService(server.backend(**kwargs), model_name="m", default_params=GREEDY)


def test_request_carries_the_conversation_the_parameters_and_the_key():
    server = Server()
    service = service_on(server, api_key="sk-test")
    conversation = service.new_conversation("Be brief.")
    conversation.add_exchange("Hi", "Hello!")
    params = GenerationParams(
        max_new_tokens=9, temperature=0.5, top_p=0.8, top_k=0, repetition_penalty=1.2, seed=3
    )
    service.reply(conversation, "Bye", params.updated(stop=["###"]))
    request = server.requests[0]
    assert str(request.url) == f"{BASE}/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert json.loads(request.content) == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 9,
        "temperature": 0.5,
        "top_p": 0.8,
        "top_k": -1,  # vLLM's "off"
        "repetition_penalty": 1.2,
        "stop": ["###"],
        "seed": 3,
    }
    service.reply(service.new_conversation(), "Hi", GREEDY)
    greedy = json.loads(server.requests[1].content)
    assert greedy["temperature"] == 0.0 and "seed" not in greedy and "stop" not in greedy
    keyless = Server()
    service_on(keyless).reply(service.new_conversation(), "Hi")
    assert "authorization" not in keyless.requests[0].headers


def test_deltas_finish_reason_and_usage_come_from_the_stream():
    service = service_on(Server())
    conversation = service.new_conversation()
    stream = service.start_reply(conversation, "Hi")
    assert list(stream) == ["Hello", " there", "!"]
    result = stream.result
    assert (result.text, result.finish_reason) == ("Hello there!", "stop")
    assert (result.prompt_tokens, result.completion_tokens) == (7, 3)  # the server's usage
    assert result.dropped_messages == 0 and result.first_token_seconds is not None
    assert conversation.messages[-1] == {"role": "assistant", "content": "Hello there!"}


def test_without_usage_the_content_chunks_are_counted_and_length_is_reported():
    lines = sse(delta("a"), delta("b"), {"choices": [{"index": 0, "finish_reason": "length"}]})
    service = service_on(Server(lines))
    result = service.reply(service.new_conversation(), "Hi")
    assert (result.text, result.finish_reason) == ("ab", "length")
    assert (result.prompt_tokens, result.completion_tokens) == (0, 2)


def test_greedy_replies_are_cached_and_the_server_is_asked_once():
    server = Server()
    service = service_on(server)
    first = service.reply(service.new_conversation(), "Hi")
    second = service.reply(service.new_conversation(), "Hi")
    assert not first.cached and second.cached and second.text == first.text
    assert second.prompt_tokens == 7 and len(server.requests) == 1


def test_the_model_is_the_servers_first_when_none_is_configured():
    server = Server()
    assert server.backend(model=None).model == "served-model"
    assert str(server.requests[0].url) == f"{BASE}/models"


def test_cancel_closes_the_response_between_chunks_and_keeps_the_partial_reply():
    server = Server(sse(*[delta(f"{n} ") for n in range(50)], delta(None, "stop")))
    service = service_on(server)
    conversation = service.new_conversation()
    stream = service.start_reply(conversation, "Count")
    received = []
    for piece in stream:
        received.append(piece)
        stream.cancel()
    assert received == ["0 "]
    assert stream.result.finish_reason == "cancelled"
    assert conversation.messages[-1]["content"] == "0 "
    assert server.stream.closed and server.stream.sent < 5


def test_an_abandoned_stream_that_never_ran_closes_its_response():
    server = Server()
    service = service_on(server)
    conversation = service.new_conversation()
    stream = service.start_reply(conversation, "Hi")
    iterator = iter(stream)
    stream.abandon()  # the client went away before the first delta was asked for
    iterator.close()
    assert server.stream.closed and conversation.messages == []


@pytest.mark.parametrize(
    ("status", "body", "detail"),
    [
        (401, {"error": {"message": "bad key", "type": "auth"}}, "HTTP 401 Unauthorized: bad key"),
        (400, {"object": "error", "message": "too long"}, "HTTP 400 Bad Request: too long"),
        (422, {"error": "Input validation error", "error_type": "validation"}, "validation error"),
        (404, {"detail": "Not Found"}, "HTTP 404 Not Found: Not Found"),
    ],
)
def test_an_error_status_names_the_url_the_status_and_the_servers_message(status, body, detail):
    service = service_on(Server(status=status, json=body))
    conversation = service.new_conversation()
    with pytest.raises(RemoteBackendError) as error:
        service.start_reply(conversation, "Hi")  # before any text streams
    assert f"remote backend {BASE}/chat/completions: " in str(error.value)
    assert detail in str(error.value)
    assert conversation.messages == []


def test_an_error_page_that_is_not_json_is_quoted():
    service = service_on(Server(status=503, text="<html>upstream down</html>"))
    with pytest.raises(RemoteBackendError, match="HTTP 503 Service Unavailable: <html>upstream"):
        service.start_reply(service.new_conversation(), "Hi")


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        (["data: {not json\n\n"], "not JSON"),
        (["<html>\n"], "unexpected line '<html>'"),
        (sse({"object": "chat.completion"}), "no 'choices' list"),
        (sse(delta("Hi"), {"error": {"message": "CUDA out of memory"}}), "CUDA out of memory"),
    ],
)
def test_a_malformed_stream_is_a_clear_error_and_changes_nothing(lines, problem):
    service = service_on(Server(lines))
    conversation = service.new_conversation()
    stream = service.start_reply(conversation, "Hi")
    with pytest.raises(RemoteBackendError, match=problem) as error:
        list(stream)
    assert f"{BASE}/chat/completions" in str(error.value)
    assert conversation.messages == [] and stream.result is None


def test_a_stream_cut_short_is_an_error():
    service = service_on(Server(sse(delta("Hel")), done=False))  # no finish_reason, no [DONE]
    stream = service.start_reply(service.new_conversation(), "Hi")
    with pytest.raises(RemoteBackendError, match="ended before the reply was complete"):
        list(stream)


class BrokenStream(RecordingStream):
    """A body that fails after its first line, the way a dying or stalled server does."""

    def __init__(self, error: Exception) -> None:
        super().__init__(sse(delta("Hel")))
        self.error = error

    def __iter__(self):
        yield from super().__iter__()
        raise self.error


@pytest.mark.parametrize(
    ("error", "problem"),
    [
        (httpx.ReadTimeout("timed out"), "stalled .no data within REMOTE_TIMEOUT seconds"),
        (httpx.RemoteProtocolError("peer closed connection"), "broke mid-reply .peer closed"),
    ],
)
def test_a_server_that_fails_mid_reply_is_a_clear_error(error, problem):
    server = Server()
    server.stream = BrokenStream(error)
    stream = service_on(server).start_reply(Conversation(), "Hi")
    with pytest.raises(RemoteBackendError, match=problem):
        list(stream)
    assert server.stream.closed


def test_a_server_that_does_not_answer_in_time_names_the_timeout():
    def silent(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out")

    backend = RemoteBackend(BASE, model="m", timeout=7, transport=httpx.MockTransport(silent))
    service = ChatService(backend, model_name="m")
    with pytest.raises(RemoteBackendError, match=r"no answer within 7 s \(REMOTE_TIMEOUT\)"):
        service.start_reply(service.new_conversation(), "Hi")


def test_a_response_that_is_not_a_stream_is_refused():
    service = service_on(Server(json={"choices": []}))  # a server that ignored "stream"
    with pytest.raises(RemoteBackendError, match="expected a stream of server-sent events"):
        service.start_reply(service.new_conversation(), "Hi")


def test_local_only_options_are_refused_with_a_remote_backend():
    settings = load_settings(_env_file=None, backend="remote", remote_base_url=BASE)
    with pytest.raises(ConfigError, match="BACKEND=remote loads none"):
        build_service(settings, adapter_path="outputs/adapters/x")
    with pytest.raises(ConfigError, match="BACKEND=remote loads none"):
        build_service(settings, engine_name="scratch")
