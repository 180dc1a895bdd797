"""The benchmark's llama.cpp server row: ``python -m llama_cpp.server`` started on the GGUF file
with our rows' thread count, measured by the same OpenAI streaming client as our server, and a
crash (at start or mid-stream) reported as a failed row. The real llama-cpp-python takes 10
minutes to build (``make setup-llamacpp``), so these tests put a stand-in ``llama_cpp.server``
first on the child's path: it answers as llama.cpp's server does (one chunk per token, no
usage, ``[DONE]``)."""

import textwrap

import pytest

from src.benchmarks import llama_cpp
from src.benchmarks.api_stream import (
    LLAMA_CPP_GREEDY,
    ApiServer,
    ServerFailed,
    measure_api_streams,
)
from src.benchmarks.report import markdown

STAND_IN = """
import argparse, json, os, signal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
for option in ("--model", "--n_threads", "--n_threads_batch", "--n_ctx", "--host", "--port"):
    parser.add_argument(option)
args = parser.parse_args()
if {crash!r} == "start":
    os.kill(os.getpid(), signal.SIGSEGV)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = json.dumps({{"data": [{{"id": f"{{args.model}} threads={{args.n_threads}}"}}]}})
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        timed = request["max_tokens"] > 4  # not the warm-up
        if {crash!r} == "decode" and timed:
            os.kill(os.getpid(), signal.SIGSEGV)
        greedy = request["temperature"] == 0 and request.get("repeat_penalty") == 1.0
        if ({crash!r} == "error" and timed) or not greedy:
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        words = [{{"delta": {{"role": "assistant"}}}}]
        words += [{{"delta": {{"content": f" w{{i}}"}}}} for i in range(request["max_tokens"])]
        events = [*(json.dumps({{"choices": [word]}}) for word in words), "[DONE]"]
        for index, data in enumerate(events):
            if {crash!r} == "midway" and timed and index == 3:  # after two words
                self.wfile.flush()
                os.kill(os.getpid(), signal.SIGSEGV)
            event = f"data: {{data}}\\r\\n\\r\\n".encode()
            self.wfile.write(b"%x\\r\\n%s\\r\\n" % (len(event), event))
        self.wfile.write(b"0\\r\\n\\r\\n")

    def log_message(self, *args):
        pass


ThreadingHTTPServer((args.host, int(args.port)), Handler).serve_forever()
"""


def stand_in(tmp_path, monkeypatch, crash: str = "") -> None:
    server = tmp_path / "llama_cpp" / "server"
    server.mkdir(parents=True)
    (tmp_path / "llama_cpp" / "__init__.py").write_text("")
    (server / "__init__.py").write_text("")
    (server / "__main__.py").write_text(textwrap.dedent(STAND_IN.format(crash=crash)))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))


def test_the_server_is_started_on_the_file_with_our_threads_and_measured_like_ours(
    tmp_path, monkeypatch
):
    stand_in(tmp_path, monkeypatch)
    with llama_cpp.served(tmp_path / "m.gguf", threads=2) as url:
        (row,) = measure_api_streams(llama(url), "a long text", 6, 2, progress=str)
    assert row["name"] == "llama.cpp" and row["tokens"] == 6  # no usage: one chunk per token
    assert row["text"] == " w0 w1 w2 w3 w4 w5" and row["long_prompt_tokens"] is None
    assert row["tokens_per_second"] > 0 and row["first_token_seconds"] > 0
    assert row["long_prompt_first_token_seconds"] > 0
    table = markdown({"machine": "test", "serving": serving_with([row])})
    assert "| llama.cpp | " in table and " | 1.00x | " in table and "| 6 |" in table


def test_the_server_gets_the_file_and_the_thread_count(tmp_path, monkeypatch):
    from src.benchmarks.api_stream import served_model

    stand_in(tmp_path, monkeypatch)
    with llama_cpp.served(tmp_path / "m.gguf", threads=3) as url:
        assert served_model(url) == f"{tmp_path / 'm.gguf'} threads=3"


def llama(url: str) -> list[ApiServer]:
    return [ApiServer("llama.cpp", url, LLAMA_CPP_GREEDY)]


@pytest.mark.parametrize("when", ["start", "decode", "midway"])
def test_a_crash_fails_the_row_by_name(tmp_path, monkeypatch, when):
    stand_in(tmp_path, monkeypatch, crash=when)
    crashed = pytest.raises(llama_cpp.RowFailed, match=r"crashed \(SIGSEGV\)")
    with crashed as failure, llama_cpp.served(tmp_path / "m.gguf", threads=2) as url:
        measure_api_streams(llama(url), "text", 8, 1, progress=str)
    ours = {"name": "ours", "tokens_per_second": 20.0, "first_token_seconds": 0.1,
            "long_prompt_first_token_seconds": 2.0, "long_prompt_tokens": 500,
            "tokens": 8}  # fmt: skip
    failed = {"name": "llama.cpp", "failed": str(failure.value)}
    table = markdown({"machine": "test", "serving": serving_with([ours, failed])})
    assert "| llama.cpp | failed: llama.cpp crashed (SIGSEGV) | - | - | - | - |" in table
    assert "| ours | 20.0 | - | 0.100 | 2.000 | 8 |" in table  # no llama.cpp speed to compare
    assert "first token, 500-token prompt (s)" in table


def test_an_error_answer_names_the_server_that_gave_it(tmp_path, monkeypatch):
    """A server that answers 500 (alive, so not a crash) fails as that server's request."""
    stand_in(tmp_path, monkeypatch, crash="error")
    with llama_cpp.served(tmp_path / "m.gguf", threads=2) as url:
        with pytest.raises(ServerFailed, match="500") as failure:
            measure_api_streams(llama(url), "text", 8, 1, progress=str)
        assert failure.value.name == "llama.cpp"
        # Without its greedy fields (temperature 0, no repetition penalty) it refuses too.
        with pytest.raises(ServerFailed):
            measure_api_streams([ApiServer("x", url, {})], "text", 8, 1, progress=str)


def serving_with(api_rows: list[dict]) -> dict:
    one = {"clients": 1, "aggregate_tokens_per_second": 10.0, "first_token_p50": 0.1,
           "first_token_p95": 0.1, "latency_p50": 1.0, "latency_p95": 1.0}  # fmt: skip
    return {"new_tokens": 8, "repetitions": 1, "rows": [one], "peak_memory_mb": 100.0,
            "api_single_stream": api_rows}  # fmt: skip
