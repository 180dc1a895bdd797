"""The HTTP connection layer: uvicorn's h11 protocol with limits a public server needs.

uvicorn's own protocols buffer request headers without bound (httptools) and keep a
connection that sends nothing, or half a request, open for ever. ``GuardedH11Protocol``
adds, from the settings:

- ``MAX_HEADER_BYTES``: the request line and headers of one request (h11's buffer limit);
  more gets 431 and the connection is closed.
- ``HEADER_TIMEOUT_SECONDS``: from the connection (or the end of the previous response) to
  the last header; a client that has not sent them by then gets 408 and is disconnected.
- ``KEEP_ALIVE_SECONDS``: an idle keep-alive connection is closed after this long.
- ``MAX_CONNECTIONS_PER_CLIENT``: open connections from one address; the next one gets 429
  and is closed at once. A trusted proxy (uvicorn's ``--forwarded-allow-ips``, loopback by
  default, with ``--proxy-headers``, on by default) carries many clients' connections, so its
  address is not counted; the per-client reply limit still applies to each client it names.

The header count and the time a body may take are checked in the app
(``src/web/errors.py``: ``RequestLimits``), which works under any server. Refusals made here,
before the app sees a request, are written directly in the API's JSON error shape.

``python -m src.web`` (``make serve``, the Docker image) serves with this protocol; with
uvicorn's command line, add ``--http src.web.server:GuardedH11Protocol``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from http import HTTPStatus
from typing import Any, ClassVar

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from src.config import Settings, load_settings

logger = logging.getLogger(__name__)


def raw_error(status: int, message: str, error_type: str, param: str | None) -> bytes:
    """A complete HTTP/1.1 response in the API's error shape that closes the connection."""
    body = json.dumps({"error": {"message": message, "type": error_type, "param": param}})
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return (head + body).encode("ascii")


class GuardedH11Protocol(H11Protocol):
    """One client connection (uvicorn makes one instance per connection)."""

    settings: ClassVar[Settings | None] = None  # unset: read once from the environment (.env)

    @classmethod
    def with_settings(cls, settings: Settings) -> type[GuardedH11Protocol]:
        """This protocol with the limits of ``settings`` (for a server built in code)."""
        return type(cls.__name__, (cls,), {"settings": settings})

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        if type(self).settings is None:
            type(self).settings = load_settings()
        self.limits: Settings = type(self).settings
        self.conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes
        )
        self.timeout_keep_alive = self.limits.keep_alive_seconds
        self.header_timer: asyncio.TimerHandle | None = None
        self.trusted_proxies = trusted_proxies(config) if config.proxy_headers else None

    # ---- connections per address -------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        address = self.client[0] if self.client else None
        same_address = sum(
            1
            for connection in self.connections
            if isinstance(connection, H11Protocol)
            and connection.client
            and connection.client[0] == address
        )
        counted = address is not None and not is_trusted(address, self.trusted_proxies)
        if counted and same_address > self.limits.max_connections_per_client:
            self.refuse(
                429,
                f"too many open connections from {address} (MAX_CONNECTIONS_PER_CLIENT is "
                f"{self.limits.max_connections_per_client})",
                "too_many_connections",
            )
            return
        self.start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_header_timer()
        super().connection_lost(exc)

    # ---- the time to send a request's headers ------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.header_timer is None and self.conn.their_state is h11.IDLE:
            self.start_header_timer()  # the first bytes of a request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self.stop_header_timer()  # headers complete (or the connection failed)

    def start_header_timer(self) -> None:
        self.stop_header_timer()
        self.header_timer = self.loop.call_later(
            self.limits.header_timeout_seconds, self.on_header_timeout
        )

    def stop_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def on_header_timeout(self) -> None:
        self.header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.refuse(
                408,
                "headers: the request's headers did not arrive within "
                f"{self.limits.header_timeout_seconds:g} s (HEADER_TIMEOUT_SECONDS)",
                "request_timeout",
                "headers",
            )

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # uvicorn's keep-alive timer now bounds the wait for the next request's first byte.
        self.stop_header_timer()

    # ---- requests h11 cannot parse -----------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        buffered, _ = self.conn.trailing_data
        if len(buffered) > self.limits.max_header_bytes:
            self.refuse(
                431,
                f"headers: the request line and headers are larger than "
                f"{self.limits.max_header_bytes} bytes (MAX_HEADER_BYTES)",
                "request_too_large",
                "headers",
            )
        else:
            self.refuse(400, f"malformed HTTP request ({msg})", "invalid_request_error")

    def refuse(self, status: int, message: str, error_type: str, param: str | None = None) -> None:
        logger.info("%s %s: %s", self.client[0] if self.client else "-", status, message)
        self.stop_header_timer()
        self.transport.write(raw_error(status, message, error_type, param))
        self.transport.close()


TrustedProxies = tuple[bool, list[ipaddress.IPv4Network | ipaddress.IPv6Network], set[str]]


def trusted_proxies(config: Config) -> TrustedProxies:
    """uvicorn's ``forwarded_allow_ips``: (trust everyone, networks, other literals)."""
    raw = config.forwarded_allow_ips
    hosts = [h.strip() for h in (raw.split(",") if isinstance(raw, str) else raw) if h.strip()]
    networks, literals = [], set()
    for host in hosts:
        try:
            networks.append(ipaddress.ip_network(host, strict=False))
        except ValueError:
            literals.add(host)
    return "*" in hosts, networks, literals


def is_trusted(address: str, trusted: TrustedProxies | None) -> bool:
    if trusted is None:
        return False
    everyone, networks, literals = trusted
    if everyone or address in literals:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def serve(settings: Settings) -> None:
    """Serve the API on API_HOST:API_PORT with the connection limits above."""
    import uvicorn

    uvicorn.run(
        "src.web.api:app",
        host=settings.api_host,
        port=settings.api_port,
        http=GuardedH11Protocol.with_settings(settings),
    )
