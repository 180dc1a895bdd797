"""Cold start: from process start to the first streamed token, for the CLI and the server
(after the one-time model conversion)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from src.benchmarks.processes import bench_env, start_server, stop, wait_until_ready
from src.config import REPO_ROOT


def cli_first_token_seconds() -> float:
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "src/mvp_chatbot.py"],
        cwd=REPO_ROOT,
        env=bench_env(DO_SAMPLE="false"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    process.stdin.write(b"Hello!\n")
    process.stdin.close()
    process.stdout.read(1)  # blocks until the first character of the reply
    elapsed = time.perf_counter() - started
    process.stdout.read()
    process.wait()
    return elapsed


def server_first_token_seconds() -> tuple[float, float]:
    """(seconds until /health is 200, seconds until the first streamed token)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as data_dir:
        process, url = start_server(Path(data_dir))
        try:
            ready = wait_until_ready(url, process)
            body = {"message": "Hello!", "do_sample": False, "max_new_tokens": 8}
            with httpx.stream("POST", f"{url}/chat/stream", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data:") and json.loads(line[5:]).get("text"):
                        break
            return ready, time.perf_counter() - started
        finally:
            stop(process)
