"""The server entry points as users start them: separate processes on 127.0.0.1."""

import subprocess
import sys
import time

import httpx
import pytest

from src.benchmarks.processes import free_port, stop
from src.config import REPO_ROOT
from tests.integration.conftest import clean_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 120) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} never answered 200")


def start(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=clean_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_uvicorn_command_from_the_readme(converted_bundled_model, tmp_path):
    port = free_port()
    server = start(
        ["-m", "uvicorn", "src.web.api:app", "--host", "127.0.0.1", "--port", str(port)],
        MODEL_NAME="smollm2-135m-instruct",
        DATA_DIR=str(tmp_path),
        DO_SAMPLE="false",
    )
    try:
        health = wait_for_http(f"http://127.0.0.1:{port}/health", server)
        assert health.json()["model"] == "smollm2-135m-instruct"
        reply = httpx.post(
            f"http://127.0.0.1:{port}/chat",
            timeout=60,
            json={"message": "What is the capital of France?"},
        )
        assert "Paris" in reply.json()["response"]
        assert httpx.get(f"http://127.0.0.1:{port}/ui/", timeout=10).status_code == 200
    finally:
        stop(server)
    assert (tmp_path / "sessions.sqlite3").is_file()


def test_web_app_entry_point_serves_the_ui(converted_bundled_model):
    port = free_port()
    web = start(["src/web_app.py", "--port", str(port), "--model", "smollm2-135m-instruct"])
    try:
        page = wait_for_http(f"http://127.0.0.1:{port}/", web)
        assert "Mini-Claude" in page.text or "gradio" in page.text.lower()
    finally:
        stop(web)


def test_python_m_src_web_serves_on_the_configured_host_and_port(converted_bundled_model, tmp_path):
    """`make serve`'s command: host and port from API_HOST / API_PORT."""
    port = free_port()
    server = start(
        ["-m", "src.web"],
        API_HOST="127.0.0.1",
        API_PORT=str(port),
        MODEL_NAME="smollm2-135m-instruct",
        DATA_DIR=str(tmp_path),
    )
    try:
        health = wait_for_http(f"http://127.0.0.1:{port}/health", server)
        assert health.json()["model"] == "smollm2-135m-instruct"
    finally:
        stop(server)


def test_python_m_src_web_names_a_bad_setting():
    result = subprocess.run(
        [sys.executable, "-m", "src.web"],
        cwd=REPO_ROOT,
        env=clean_env(API_PORT="not-a-port"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "API_PORT" in result.stderr and "Traceback" not in result.stderr
