"""Starting the real entry points as separate processes, for the serving and cold-start
measurements (loopback only)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from src.config import REPO_ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_env(**overrides: str) -> dict[str, str]:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        MODEL_NAME="smollm2-135m-instruct",
        MODEL_CACHE_DIR=str(REPO_ROOT / "models"),
    )
    env.update(overrides)
    return env


def start_server(
    data_dir: Path, log: Path | None = None, port: int | None = None, **env: str
) -> tuple[subprocess.Popen, str]:
    """uvicorn with the API on 127.0.0.1 and a free port, with the connection limits of
    ``src/web/server.py``; its output goes to ``log`` (a file,
    appended to) or nowhere."""
    port = port or free_port()
    output = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "src.web.api:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--http",
            "src.web.server:GuardedH11Protocol",
            "--log-level",
            "warning",
        ],
        cwd=REPO_ROOT,
        env=bench_env(DATA_DIR=str(data_dir), **env),
        stdout=output,
        stderr=output,
    )
    if log is not None:
        output.close()  # the child has its own copy
    return process, f"http://127.0.0.1:{port}"


def wait_until_ready(
    url: str, process: subprocess.Popen, timeout: float = 180, path: str = "/health"
) -> float:
    """Seconds until ``path`` answers 200."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError("the server did not become ready")


def memory_mb(pid: int, field: str) -> float | None:
    """A memory figure of /proc/PID/status (VmRSS, VmHWM, ...), in MB; None off Linux."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_memory_mb(pid: int) -> float | None:
    """The process's peak resident memory (VmHWM), in MB."""
    return memory_mb(pid, "VmHWM")


def rss_mb(pid: int) -> float | None:
    """The process's resident memory now (VmRSS), in MB."""
    return memory_mb(pid, "VmRSS")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class ServerSupervisor:
    """The real server on a fixed port, which a soak stops with a signal and starts again on
    the same data, as an operator or a crash would; ``windows`` holds the times it was down."""

    def __init__(self, data_dir: Path, log: Path | None = None, **env: str) -> None:
        self.data_dir, self.log, self.env = data_dir, log, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.windows: list[list[float]] = []  # [down since, up again] (time.monotonic())

    def start(self) -> float:
        """Start it and wait until /health says ready; returns the seconds that took."""
        self.process, _ = start_server(self.data_dir, self.log, port=self.port, **self.env)
        return wait_until_ready(self.url, self.process)

    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def disrupt(self, signum: int, exit_timeout: float = 60) -> None:
        """Send ``signum``, wait for the process to end (SIGKILL after ``exit_timeout``),
        start it again."""
        window = [time.monotonic(), time.monotonic()]
        self.windows.append(window)
        assert self.process is not None
        self.process.send_signal(signum)
        try:
            self.process.wait(exit_timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.start()
        window[1] = time.monotonic()

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
