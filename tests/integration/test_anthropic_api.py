"""Anthropic's Messages API through the official ``anthropic`` SDK, against a real uvicorn on
127.0.0.1 serving the bundled SmolLM2: plain and streamed messages, stop reasons, tools
(enforced by the same grammar as the OpenAI routes, a full loop), token counting, and errors
in Anthropic's shape."""

import json

import anthropic
import httpx
import jsonschema
import pytest
from anthropic import Anthropic

from src.web.api import create_app
from tests.conftest import bundled_settings
from tests.live_server import LiveServer
from tests.tool_schemas import CITY_SCHEMA, TIME_TOOL, WEATHER_TOOL, anthropic_tool

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODEL = "any-name"  # echoed: the server has one model
WEATHER = anthropic_tool(WEATHER_TOOL)
TIME = anthropic_tool(TIME_TOOL)
ASK = [{"role": "user", "content": "What is the capital of France?"}]
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
# The server samples greedily by default here (DO_SAMPLE=false): today's SDK sends no
# temperature (the API still takes one: test_sampling_settings_of_older_clients_are_honoured).
GREEDY = {"model": MODEL, "max_tokens": 40}
CALLS = {"model": MODEL, "max_tokens": 120}  # room for a whole call or two


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundled_model_path):
    # No prefix cache: replies are compared across requests (see test_openai_features.py);
    # no response cache: a repeated greedy request is generated again, token by token.
    settings = bundled_settings(
        data_dir=tmp_path_factory.mktemp("data"),
        prefix_cache_mb=0,
        response_cache_size=0,
        do_sample=False,
    )
    with LiveServer(create_app(settings, mount_ui=False)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server) -> Anthropic:
    return Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def text_of(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_a_message_is_the_same_reply_the_openai_route_gives(client, server):
    message = client.messages.create(messages=ASK, system="Answer briefly.", **GREEDY)
    assert message.type == "message" and message.role == "assistant"
    assert message.model == "smollm2-135m-instruct" and message.id.startswith("msg_")
    assert message.stop_reason in ("end_turn", "max_tokens") and text_of(message)
    assert 0 < message.usage.output_tokens <= 40
    # One core: the OpenAI route, asked the same, gives the same greedy reply and counts.
    openai = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={
            "messages": [{"role": "system", "content": "Answer briefly."}, *ASK],
            "temperature": 0,
            "max_tokens": 40,
        },
        timeout=120,
    ).json()
    assert text_of(message) == openai["choices"][0]["message"]["content"]
    assert message.usage.input_tokens == openai["usage"]["prompt_tokens"]
    assert message.usage.output_tokens == openai["usage"]["completion_tokens"]
    # System as text blocks reads as the same system prompt.
    blocks = client.messages.create(
        messages=ASK, system=[{"type": "text", "text": "Answer briefly."}], **GREEDY
    )
    assert text_of(blocks) == text_of(message)
    counted = client.messages.count_tokens(model=MODEL, messages=ASK, system="Answer briefly.")
    assert counted.input_tokens == message.usage.input_tokens


def test_a_streamed_message_adds_up_to_the_plain_one(client):
    plain = client.messages.create(messages=ASK, **GREEDY)
    with client.messages.stream(messages=ASK, **GREEDY) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == text_of(plain)
    assert text_of(final) == text_of(plain) and final.stop_reason == plain.stop_reason
    assert final.usage.input_tokens == plain.usage.input_tokens
    assert final.usage.output_tokens == plain.usage.output_tokens


def test_the_event_sequence_is_anthropics(client):
    events = list(client.messages.create(messages=ASK, stream=True, **GREEDY))
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1:4] == ["content_block_start", "content_block_delta", "content_block_delta"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    assert events[0].message.usage.input_tokens > 0


def test_stop_reasons_max_tokens_and_stop_sequence(client):
    short = client.messages.create(messages=ASK, model=MODEL, max_tokens=2)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2
    whole = text_of(client.messages.create(messages=ASK, **GREEDY))
    stop = whole.split()[2]  # a word from the middle of the greedy reply
    for stream in (False, True):
        if stream:
            with client.messages.stream(messages=ASK, stop_sequences=[stop], **GREEDY) as s:
                cut = s.get_final_message()
        else:
            cut = client.messages.create(messages=ASK, stop_sequences=["zzz", stop], **GREEDY)
        assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
        assert text_of(cut) == whole[: whole.index(stop)]


def test_sampling_settings_of_older_clients_are_honoured(client):
    greedy = text_of(client.messages.create(messages=ASK, **GREEDY))
    # Sampling from only the most likely token is greedy decoding, at any temperature.
    top_one = {"temperature": 1.0, "top_k": 1}
    assert text_of(client.messages.create(messages=ASK, extra_body=top_one, **GREEDY)) == greedy
    assert (
        text_of(client.messages.create(messages=ASK, extra_body={"temperature": 0}, **GREEDY))
        == greedy
    )
    sampled = {
        text_of(client.messages.create(messages=ASK, extra_body={"temperature": 1.0}, **GREEDY))
        for _ in range(3)
    }
    assert sampled != {greedy}  # three samples at temperature 1 are not all the greedy reply


def test_output_config_format_gives_json_that_validates(client):
    schema = CITY_SCHEMA
    for ask in (
        {"output_config": {"format": {"type": "json_schema", "schema": schema}}},
        {"extra_body": {"output_format": {"type": "json_schema", "schema": schema}}},
    ):
        message = client.messages.create(
            messages=[{"role": "user", "content": "Describe Paris as JSON."}],
            model=MODEL,
            max_tokens=120,
            **ask,
        )
        assert message.stop_reason == "end_turn", message
        jsonschema.validate(json.loads(text_of(message)), schema)


def valid_use(block, tools) -> None:
    schema = next(tool["input_schema"] for tool in tools if tool["name"] == block.name)
    jsonschema.validate(block.input, schema)
    assert block.id


def test_tool_choice_any_tool_and_none(client):
    tools = [WEATHER, TIME]
    forced = client.messages.create(
        messages=ASK_WEATHER, tools=tools, tool_choice={"type": "any"}, **CALLS
    )
    uses = [block for block in forced.content if block.type == "tool_use"]
    assert forced.stop_reason == "tool_use" and uses
    for block in uses:
        valid_use(block, tools)
    named = client.messages.create(
        messages=ASK_WEATHER,
        tools=tools,
        tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
        **CALLS,
    )
    uses = [block for block in named.content if block.type == "tool_use"]
    assert [block.name for block in uses] == ["get_time"]
    valid_use(uses[0], tools)
    none = client.messages.create(
        messages=ASK_WEATHER, tools=tools, tool_choice={"type": "none"}, **CALLS
    )
    assert none.stop_reason != "tool_use" and text_of(none)
    assert all(block.type == "text" for block in none.content)
    # Tools are part of the prompt the model reads, and of its count.
    bare = client.messages.count_tokens(model=MODEL, messages=ASK_WEATHER)
    with_tools = client.messages.count_tokens(model=MODEL, messages=ASK_WEATHER, tools=tools)
    assert with_tools.input_tokens > bare.input_tokens


def test_streamed_tool_use_adds_up_to_the_plain_one(client):
    # One call, so that max_tokens cannot cut a further one short (a cut call is announced
    # in the stream but, unfinished, is not in the result: see the OpenAI routes' test).
    one_call = {"type": "any", "disable_parallel_tool_use": True}
    ask = dict(messages=ASK_WEATHER, tools=[WEATHER, TIME], tool_choice=one_call, **CALLS)
    plain = client.messages.create(**ask)
    with client.messages.stream(**ask) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert any(
        e.type == "content_block_delta" and e.delta.type == "input_json_delta" for e in events
    )
    assert final.stop_reason == plain.stop_reason == "tool_use"
    streamed = [(b.name, b.input) for b in final.content if b.type == "tool_use"]
    assert streamed == [(b.name, b.input) for b in plain.content if b.type == "tool_use"]


def test_a_full_tool_loop(client):
    tools = [WEATHER]
    messages = [*ASK_WEATHER]
    first = client.messages.create(
        messages=messages, tools=tools, tool_choice={"type": "any"}, **CALLS
    )
    uses = [block for block in first.content if block.type == "tool_use"]
    messages.append({"role": "assistant", "content": [b.model_dump() for b in first.content]})
    messages.append(
        {
            "role": "user",
            "content": [
                *(
                    {"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 22 C"}
                    for use in uses
                ),
                {"type": "text", "text": "So, what should I wear?"},
            ],
        }
    )
    final = client.messages.create(
        messages=messages, tools=tools, tool_choice={"type": "none"}, **CALLS
    )
    assert final.stop_reason in ("end_turn", "max_tokens") and text_of(final)
    # The tool's answer is in the prompt the model read.
    grown = client.messages.count_tokens(
        model=MODEL, messages=messages, tools=tools, tool_choice={"type": "none"}
    )
    asked = client.messages.count_tokens(model=MODEL, messages=ASK_WEATHER)
    assert grown.input_tokens == final.usage.input_tokens > asked.input_tokens


def test_bad_requests_are_errors_in_anthropics_shape(client, server):
    cases = [
        ({"messages": ASK, "model": MODEL}, "max_tokens"),  # required, as Anthropic's
        ({**GREEDY, "messages": [{"role": "user", "content": []}]}, "must not be empty"),
        (
            {
                **GREEDY,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "url", "url": "x"}}],
                    }
                ],
            },
            "'image' block cannot be read",
        ),
        ({**GREEDY, "messages": [*ASK, {"role": "assistant", "content": "Paris"}]}, "last"),
        ({**GREEDY, "messages": ASK, "tool_choice": {"type": "tool"}}, "needs the tool's name"),
        ({**GREEDY, "messages": ASK, "temperature": 1.5}, "temperature"),
        ({**GREEDY, "messages": ASK, "output_config": {"format": {"type": "xml"}}}, "format"),
        ({**GREEDY, "messages": ASK, "max_tokens": 10**6}, "max_tokens"),
        ({**GREEDY, "messages": ASK, "unknown_field": 1}, "unknown_field"),
    ]
    for body, named in cases:
        response = httpx.post(f"{server.url}/v1/messages", json=body, timeout=60)
        assert response.status_code == 400, (body, response.text)
        error = response.json()
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert named in error["error"]["message"], error
    # The SDK reads them as its own errors.
    with pytest.raises(anthropic.BadRequestError, match="last message must be the user's"):
        client.messages.create(messages=[*ASK, {"role": "assistant", "content": "P"}], **GREEDY)
    missing = httpx.get(f"{server.url}/v1/messages/nothing-here", timeout=60)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_the_api_key_is_read_from_x_api_key(tmp_path, bundled_model_path):
    settings = bundled_settings(data_dir=tmp_path, api_key="s3cret-key")
    with LiveServer(create_app(settings, mount_ui=False)) as live:
        right = Anthropic(base_url=live.url, api_key="s3cret-key", max_retries=0)
        assert right.messages.count_tokens(model=MODEL, messages=ASK).input_tokens > 0
        wrong = Anthropic(base_url=live.url, api_key="wrong", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError):
            wrong.messages.count_tokens(model=MODEL, messages=ASK)
