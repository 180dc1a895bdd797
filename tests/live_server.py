"""A real uvicorn server on 127.0.0.1 and a free port, in a thread, for the length of a test."""

from __future__ import annotations

import threading
import time

import httpx
import uvicorn

from src.benchmarks.load import sse_events
from src.benchmarks.processes import free_port
from src.web.server import GuardedH11Protocol


class LiveServer:
    def __init__(self, app, wait_until_ready: bool = True) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait_until_ready = wait_until_ready
        # The protocol `python -m src.web` serves with (connection limits from the settings).
        protocol = GuardedH11Protocol.with_settings(app.state.settings)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", http=protocol
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        if self.wait_until_ready:
            while httpx.get(f"{self.url}/health").status_code != 200:
                if time.monotonic() > deadline or self.app.state.load_error:
                    raise RuntimeError(f"the model did not load: {self.app.state.load_error}")
                time.sleep(0.05)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)


def read_sse(response: httpx.Response) -> list[tuple[str | None, str]]:
    """(event, data) pairs of a server-sent event stream."""
    return list(sse_events(response))
