"""app.py, the Hugging Face Spaces entry point: imported as Spaces imports it, and run as
``python app.py``, on the real bundled model."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import httpx
import pytest

from src.benchmarks.processes import free_port, stop
from src.config import REPO_ROOT
from tests.conftest import REPO_MODEL_CACHE
from tests.integration.conftest import clean_env
from tests.integration.test_entry_points import wait_for_http

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_imported_app_has_a_demo_that_serves_the_chat_page(converted_bundled_model, monkeypatch):
    monkeypatch.setenv("MODEL_CACHE_DIR", str(REPO_MODEL_CACHE))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    spec = importlib.util.spec_from_file_location("spaces_app", REPO_ROOT / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)  # what Spaces does: the module-level demo is built on import

    assert app.demo.fns  # the UI's event handlers are there
    port = free_port()
    app.demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    try:
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=30)
        assert page.status_code == 200
        assert "gradio" in page.text.lower() and "Mini-Claude" in page.text
        config = httpx.get(f"http://127.0.0.1:{port}/config", timeout=30).json()
        assert config["title"] == "Mini-Claude"
    finally:
        app.demo.close()


def test_python_app_py_serves_the_bundled_model(converted_bundled_model):
    """``python app.py`` with the port Spaces would give it (GRADIO_SERVER_PORT), and no
    MODEL_NAME: the bundled model, not the settings' hub default."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "app.py"],
        cwd=REPO_ROOT,
        # MODEL_FALLBACK=none: trying the hub's DialoGPT would stop the app instead of falling back.
        env=clean_env(
            GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), MODEL_FALLBACK="none"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        page = wait_for_http(f"http://127.0.0.1:{port}/", process)
        assert "Mini-Claude" in page.text
    finally:
        stop(process)
    output = process.stdout.read()
    assert "DialoGPT" not in output, output  # no hub attempt, no fallback notice
