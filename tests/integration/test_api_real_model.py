"""The API on the real bundled SmolLM2, through a real uvicorn on 127.0.0.1: the official
``openai`` client, concurrent clients batched together, and clients that go away."""

import json
import threading
import time

import httpx
import pytest
from openai import OpenAI

from src.models.bundled import BUNDLED_MODEL_NAME
from src.web.api import create_app
from tests.conftest import bundled_settings
from tests.live_server import LiveServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
    "What do bees make?",
    "Name a planet.",
    "What is water made of?",
    "Give me a word that rhymes with cat.",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundled_model_path):
    settings = bundled_settings(
        data_dir=tmp_path_factory.mktemp("data"),
        do_sample=False,
        max_new_tokens=24,
        # fp32 without quantisation: batched rows then equal single requests exactly (in bf16
        # a padded batch sums in another order; test_quantized_model checks the default).
        precision="fp32",
        quantize="none",
    )
    app = create_app(settings, mount_ui=False)
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def openai_client(server):
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_openai_client_without_streaming(openai_client):
    completion = openai_client.chat.completions.create(
        model=BUNDLED_MODEL_NAME,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=24,
    )
    assert "Paris" in completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens > 0
    assert [model.id for model in openai_client.models.list()] == [BUNDLED_MODEL_NAME]


def test_openai_client_streaming_equals_non_streaming(openai_client):
    request = {
        "model": BUNDLED_MODEL_NAME,
        "messages": [
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
        "temperature": 0,
        "max_tokens": 20,
    }
    whole = openai_client.chat.completions.create(**request)
    chunks = list(openai_client.chat.completions.create(**request, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_openai_client_sees_errors_as_exceptions(openai_client):
    import openai

    with pytest.raises(openai.BadRequestError, match="temperature"):
        openai_client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "hi"}], temperature=-1
        )


def test_openai_stop_sequence_is_honoured(openai_client):
    request = {
        "model": BUNDLED_MODEL_NAME,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 24,
    }
    full = openai_client.chat.completions.create(**request).choices[0].message.content
    cut = openai_client.chat.completions.create(**request, stop=["Paris"])
    assert cut.choices[0].message.content == full[: full.index("Paris")]
    assert cut.choices[0].finish_reason == "stop"


def test_concurrent_greedy_replies_equal_one_by_one_and_are_batched(server):
    def ask(http: httpx.Client, question: str) -> str:
        # A fresh session each time, greedy (the server's default here).
        response = http.post("/chat", json={"message": question, "max_new_tokens": 24})
        assert response.status_code == 200, response.text
        return response.json()["response"]

    with server.client() as http:
        alone = [ask(http, question) for question in QUESTIONS]
    cache = server.app.state.service.cache
    cache.clear()  # the second round must be generated, not served from the cache
    cache.max_entries = 0
    engine = server.app.state.service.backend.engine
    steps_before, rows_before = engine.stats.steps, engine.stats.rows_decoded
    together: list[str | None] = [None] * len(QUESTIONS)

    def worker(index: int) -> None:
        with server.client() as http:
            together[index] = ask(http, QUESTIONS[index])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(QUESTIONS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cache.max_entries = 256
    assert together == alone
    steps = engine.stats.steps - steps_before
    rows = engine.stats.rows_decoded - rows_before
    assert rows / steps > 2, f"average batch {rows / steps:.1f}: requests were not batched"


def test_a_client_that_disconnects_mid_stream_stops_generation(server):
    engine = server.app.state.service.backend.engine
    with server.client() as http:
        with http.stream(
            "POST",
            "/chat/stream",
            json={"message": "Write a long story about the sea.", "max_new_tokens": 400},
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data:") and json.loads(line[5:]).get("text"):
                    break  # one token arrived: now go away
        rows_at_disconnect = engine.stats.rows_decoded
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            before = engine.stats.rows_decoded
            time.sleep(0.5)
            if engine.stats.rows_decoded == before:
                break
        assert engine.stats.rows_decoded == before, "generation went on after the client left"
        assert engine.stats.rows_decoded - rows_at_disconnect < 50  # stopped long before 400 tokens
        with server.app.state.service.store._lock:
            stories = server.app.state.service.store._db.execute(
                "SELECT COUNT(*) FROM sessions WHERE messages LIKE '%long story about the sea%'"
            ).fetchone()[0]
        assert stories == 0  # an abandoned reply is not saved
