"""The connection layer (src/web/server.py and RequestLimits): header size and count, the time
a client may take to send its headers and body, idle keep-alive connections, connections per
address. Raw sockets against a real uvicorn on 127.0.0.1 serving with GuardedH11Protocol, as
`python -m src.web` does; each refusal is in the API's JSON error shape and the server goes on
answering others at once."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.integration.test_security import serve

pytestmark = pytest.mark.integration


def connect(url: str, source: str | None = None) -> socket.socket:
    """A connection from ``source`` (another loopback address: 127.0.0.1 is a trusted proxy
    by default, whose connections are not counted per address)."""
    host, port = url.removeprefix("http://").split(":")
    address = (source, 0) if source else None
    return socket.create_connection((host, int(port)), timeout=10, source_address=address)


def read_until_closed(sock: socket.socket, limit: float = 10) -> bytes:
    sock.settimeout(limit)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def parse_response(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, json.loads(body)


def assert_refused(raw: bytes, status: int, setting: str, param: str | None) -> dict:
    code, body = parse_response(raw)
    assert code == status, raw[:300]
    assert setting in body["error"]["message"]
    assert body["error"]["param"] == param
    return body["error"]


def get_health(url: str, source: str) -> int:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=5) as client:
        return client.get(f"{url}/health").status_code


@pytest.fixture()
def server(tmp_path, tiny_llama_path):
    limits = dict(
        max_header_bytes=4096,
        max_header_count=20,
        header_timeout_seconds=0.5,
        body_timeout_seconds=0.5,
        keep_alive_seconds=0.5,
        max_connections_per_client=4,
    )
    with serve(tmp_path, tiny_llama_path, **limits) as live:
        yield live


def test_headers_over_the_size_limit_get_431_and_the_connection_is_closed(server):
    sock = connect(server.url)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000)
    refusal = assert_refused(read_until_closed(sock), 431, "MAX_HEADER_BYTES", "headers")
    assert refusal["type"] == "request_too_large"
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


def test_more_headers_than_the_limit_get_431(server):
    many = {f"x-h{i}": "v" for i in range(30)}
    response = httpx.get(f"{server.url}/health", headers=many, timeout=5)
    assert response.status_code == 431
    assert "MAX_HEADER_COUNT" in response.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health", headers={"x-a": "1"}).status_code == 200


def test_a_malformed_request_gets_400_in_the_error_shape(server):
    sock = connect(server.url)
    sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
    code, body = parse_response(read_until_closed(sock))
    assert code == 400 and body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /health HTTP/1.1\r\nHost: x\r\n", b"POST /chat HTTP/1.1\r\nHo"],
    ids=["nothing", "headers-never-finished", "half-a-line"],
)
def test_a_client_that_does_not_send_its_headers_in_time_is_disconnected(server, sent):
    sock = connect(server.url)
    sock.sendall(sent)
    started = time.monotonic()
    raw = read_until_closed(sock)
    assert time.monotonic() - started < 5
    assert_refused(raw, 408, "HEADER_TIMEOUT_SECONDS", "headers")


def test_a_body_that_does_not_arrive_in_time_gets_408(server):
    sock = connect(server.url)
    sock.sendall(
        b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n" + b'{"message": "hi'
    )
    raw = read_until_closed(sock)
    assert_refused(raw, 408, "BODY_TIMEOUT_SECONDS", "body")


def test_an_idle_keep_alive_connection_is_closed_and_a_slow_second_request_too(server):
    sock = connect(server.url)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.settimeout(5)
    assert b"200 OK" in sock.recv(65536)
    started = time.monotonic()
    assert read_until_closed(sock) == b""  # closed after KEEP_ALIVE_SECONDS
    assert time.monotonic() - started < 5

    sock = connect(server.url)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200 OK" in sock.recv(65536)
    sock.sendall(b"GET /health HTTP/1.1\r\n")  # the next request starts, never ends
    assert_refused(read_until_closed(sock), 408, "HEADER_TIMEOUT_SECONDS", "headers")


def test_connections_per_address_are_capped_and_freed_when_closed(tmp_path, tiny_llama_path):
    client = "127.0.0.2"
    with serve(tmp_path, tiny_llama_path, max_connections_per_client=3) as live:
        held = [connect(live.url, client) for _ in range(3)]
        time.sleep(0.2)
        extra = connect(live.url, client)
        refusal = assert_refused(read_until_closed(extra), 429, "MAX_CONNECTIONS_PER_CLIENT", None)
        assert refusal["type"] == "too_many_connections"
        # Another address is not affected, nor is a trusted proxy (loopback, by default).
        assert get_health(live.url, "127.0.0.3") == 200
        proxied = [connect(live.url) for _ in range(5)]
        assert httpx.get(f"{live.url}/health", timeout=5).status_code == 200
        held.pop().close()
        time.sleep(0.2)
        assert get_health(live.url, client) == 200
        for sock in held + proxied:
            sock.close()
