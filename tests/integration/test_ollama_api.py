"""Ollama's API through the official ``ollama`` Python client, against a real uvicorn on
127.0.0.1 serving the bundled SmolLM2 and a LoRA adapter in ADAPTERS_DIR: chat and generate,
plain and streamed, options, format, tools, log-probabilities, model names, the model list,
and errors in Ollama's shape."""

import json

import httpx
import jsonschema
import pytest
from ollama import Client, ResponseError

from src.web.api import create_app
from tests.conftest import bundled_settings
from tests.live_server import LiveServer
from tests.tool_schemas import CITY_SCHEMA, WEATHER_TOOL, openai_tool

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

BASE = "smollm2-135m-instruct"
ADAPTER = "random-lora"
GREEDY = {"temperature": 0, "num_predict": 30}
ASK = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = openai_tool(WEATHER_TOOL)


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundled_model_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    data = tmp_path_factory.mktemp("data")
    adapters = data / "adapters"
    # Random A and B (init_lora_weights=False), so that the adapter visibly changes replies.
    config = LoraConfig(
        r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = AutoModelForCausalLM.from_pretrained(bundled_model_path)
    get_peft_model(model, config).save_pretrained(adapters / ADAPTER)
    # No prefix or response cache: replies are compared across requests and routes.
    settings = bundled_settings(
        data_dir=data, adapters_dir=adapters, prefix_cache_mb=0, response_cache_size=0
    )
    with LiveServer(create_app(settings, mount_ui=False)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(host=server.url)


def openai_reply(server, messages, max_tokens=30) -> dict:
    body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).json()


def test_the_model_list_names_the_model_and_each_adapter(client, server):
    listed = {model.model: model for model in client.list().models}
    assert set(listed) == {f"{BASE}:latest", f"{ADAPTER}:latest"}
    base = listed[f"{BASE}:latest"]
    assert base.details.family == "llama" and base.details.format == "gguf"
    assert base.details.parameter_size == "135M" and base.details.quantization_level == "INT4"
    assert base.size > 50_000_000 and len(base.digest) == 64
    assert listed[f"{ADAPTER}:latest"].details.parent_model == BASE
    shown = client.show(BASE)
    assert "<|im_start|>" in shown.template and "tools" in shown.capabilities
    assert shown.modelinfo["llama.context_length"] > 1000
    assert shown.modelinfo["general.parameter_count"] > 100_000_000
    assert "temperature" in shown.parameters
    version = httpx.get(f"{server.url}/api/version", timeout=30).json()["version"]
    assert version.count(".") == 2


def test_chat_is_the_reply_the_openai_route_gives_plain_and_streamed(client, server):
    reply = client.chat(model=BASE, messages=ASK, stream=False, options=GREEDY)
    expected = openai_reply(server, ASK)
    assert (
        reply.message.role == "assistant" and reply.done and reply.done_reason in ("stop", "length")
    )
    assert reply.message.content == expected["choices"][0]["message"]["content"]
    assert reply.prompt_eval_count == expected["usage"]["prompt_tokens"]
    assert reply.eval_count == expected["usage"]["completion_tokens"]
    assert reply.total_duration > reply.eval_duration > 0 and reply.created_at
    chunks = list(client.chat(model=f"{BASE}:latest", messages=ASK, stream=True, options=GREEDY))
    assert len(chunks) > 2 and all(not c.done for c in chunks[:-1]) and chunks[-1].done
    assert "".join(c.message.content for c in chunks) == reply.message.content
    assert chunks[-1].eval_count == reply.eval_count
    assert chunks[-1].done_reason == reply.done_reason


def test_generate_uses_the_chat_template_unless_raw(client, server):
    system = "Answer briefly."
    generated = client.generate(model=BASE, prompt=ASK[0]["content"], system=system, options=GREEDY)
    chatted = client.chat(
        model=BASE, messages=[{"role": "system", "content": system}, *ASK], options=GREEDY
    )
    assert generated.response == chatted.message.content and generated.done
    pieces = list(
        client.generate(
            model=BASE, prompt=ASK[0]["content"], system=system, stream=True, options=GREEDY
        )
    )
    assert "".join(p.response for p in pieces) == generated.response
    raw = client.generate(model=BASE, prompt="The capital of France is", raw=True, options=GREEDY)
    completion = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "The capital of France is", "temperature": 0, "max_tokens": 30},
        timeout=120,
    ).json()
    assert raw.response == completion["choices"][0]["text"]
    # A request without a prompt only loads the model, as Ollama's clients use it.
    loaded = client.generate(model=BASE, prompt="")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


def test_options_are_honoured(client):
    short = client.chat(model=BASE, messages=ASK, options={**GREEDY, "num_predict": 3})
    assert short.eval_count == 3 and short.done_reason == "length"
    whole = client.chat(model=BASE, messages=ASK, options=GREEDY).message.content
    stop = whole.split()[2]
    cut = client.chat(model=BASE, messages=ASK, options={**GREEDY, "stop": [stop]})
    assert cut.message.content == whole[: whole.index(stop)] and cut.done_reason == "stop"
    # top_k 1 samples only the likeliest token: greedy, at any temperature; a seed repeats.
    assert (
        client.chat(
            model=BASE, messages=ASK, options={"temperature": 1.0, "top_k": 1, "num_predict": 30}
        ).message.content
        == whole
    )
    seeded = {"temperature": 1.0, "seed": 3, "num_predict": 30}
    first = client.chat(model=BASE, messages=ASK, options=seeded).message.content
    assert client.chat(model=BASE, messages=ASK, options=seeded).message.content == first
    # Options of Ollama's runner (threads, context size, GPUs) are accepted and ignored.
    ignored = {**GREEDY, "num_ctx": 4096, "num_thread": 2, "num_gpu": 0, "mirostat": 0}
    assert client.chat(model=BASE, messages=ASK, options=ignored).message.content == whole


def test_format_json_and_a_schema(client):
    ask = [{"role": "user", "content": "Describe Paris as JSON."}]
    plain = client.chat(
        model=BASE, messages=ask, format="json", options={**GREEDY, "num_predict": 150}
    )
    assert isinstance(json.loads(plain.message.content), dict)
    schema = CITY_SCHEMA
    shaped = client.generate(
        model=BASE,
        prompt="Describe Paris as JSON.",
        format=schema,
        options={**GREEDY, "num_predict": 150},
    )
    jsonschema.validate(json.loads(shaped.response), schema)


def test_tools_and_a_full_tool_loop(client):
    ask = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
    reply = client.chat(
        model=BASE, messages=ask, tools=[WEATHER], options={**GREEDY, "num_predict": 80}
    )
    calls = reply.message.tool_calls or []
    for call in calls:  # with Ollama the model decides; a call it makes is valid
        assert call.function.name == "get_weather"
        jsonschema.validate(dict(call.function.arguments), WEATHER["function"]["parameters"])
    assert calls or reply.message.content
    streamed = list(
        client.chat(
            model=BASE,
            messages=ask,
            tools=[WEATHER],
            stream=True,
            options={**GREEDY, "num_predict": 80},
        )
    )
    streamed_calls = [c for chunk in streamed for c in chunk.message.tool_calls or []]
    assert [(c.function.name, dict(c.function.arguments)) for c in streamed_calls] == [
        (c.function.name, dict(c.function.arguments)) for c in calls
    ]
    # The client runs the tool and sends its answer back, named by tool_name.
    call = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    answered = client.chat(
        model=BASE,
        messages=[
            *ask,
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "Sunny, 22 C", "tool_name": "get_weather"},
        ],
        options=GREEDY,
    )
    asked = client.chat(model=BASE, messages=ask, options={**GREEDY, "num_predict": 1})
    assert answered.message.content and answered.prompt_eval_count > asked.prompt_eval_count


def test_logprobs(client):
    # Without the default repetition penalty, greedy picks the model's own likeliest token
    # (the log-probabilities are the model's, before any penalty).
    options = {**GREEDY, "repeat_penalty": 1.0}
    reply = client.chat(model=BASE, messages=ASK, options=options, logprobs=True, top_logprobs=2)
    # One per token of the reply's text (a final end-of-turn token is counted, not shown).
    assert len(reply.logprobs) == reply.eval_count - (reply.done_reason == "stop")
    assert all(entry.logprob <= 0 and len(entry.top_logprobs) == 2 for entry in reply.logprobs)
    # Greedy: each chosen token is the likeliest (or tied with it: bf16 logits tie often).
    for entry in reply.logprobs:
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_an_adapter_is_a_model_by_name_and_unknown_names_are_404(client):
    base = client.chat(model=BASE, messages=ASK, options=GREEDY).message.content
    adapted = client.chat(model=ADAPTER, messages=ASK, options=GREEDY).message.content
    assert adapted != base
    running = {model.model for model in client.ps().models}
    assert running == {f"{BASE}:latest", f"{ADAPTER}:latest"}
    for name in ("llama3:8b", f"{BASE}:q4", "../random-lora"):
        with pytest.raises(ResponseError) as missing:
            client.chat(model=name, messages=ASK)
        assert missing.value.status_code == 404 and "not found" in missing.value.error


def test_bad_requests_are_errors_in_ollamas_shape(client, server):
    cases = [
        ({"messages": ASK, "options": {"bogus": 1}}, "options.bogus"),
        ({"messages": ASK, "options": {"num_predict": 0}}, "num_predict"),
        ({"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, "images"),
        ({"messages": [*ASK, {"role": "assistant", "content": "Paris"}]}, "last message"),
        ({"messages": ASK, "format": "yaml"}, "format"),
    ]
    for body, named in cases:
        response = httpx.post(
            f"{server.url}/api/chat", json={"model": BASE, "stream": False, **body}, timeout=60
        )
        assert response.status_code == 400, (body, response.text)
        assert set(response.json()) == {"error"} and named in response.json()["error"], (
            response.text
        )
    with pytest.raises(ResponseError) as refused:
        client.generate(model=BASE, prompt="x", suffix="y")
    assert refused.value.status_code == 400 and "suffix" in refused.value.error
