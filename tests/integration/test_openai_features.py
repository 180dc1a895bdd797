"""Every OpenAI feature through the official ``openai`` SDK, against a real uvicorn on
127.0.0.1 serving the bundled SmolLM2: request shapes, n, penalties, logprobs (checked against
the model's own scores), structured outputs (a property test: every reply validates), tools
(enforced by grammar, a full loop), legacy completions with echo, and the tokenizer routes."""

import json

import httpx
import jsonschema
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import OpenAI

from src.web.api import create_app
from tests.conftest import bundled_settings
from tests.live_server import LiveServer
from tests.tool_schemas import TIME_TOOL, WEATHER_TOOL, openai_tool

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODEL = "any-name"  # echoed: the server has one model
WEATHER = openai_tool(WEATHER_TOOL)
TIME = openai_tool(TIME_TOOL)
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundled_model_path):
    # No prefix cache: with bf16 weights a reply computed on a cached prefix can differ in the
    # last bits from one computed whole, and these tests compare replies across requests.
    settings = bundled_settings(data_dir=tmp_path_factory.mktemp("data"), prefix_cache_mb=0)
    app = create_app(settings, mount_ui=False)
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def stream_text(chunks) -> tuple[dict[int, str], dict[int, str]]:
    """(text, finish_reason) per choice index from a chat stream."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons


# ---- request shapes ----


def test_every_request_shape_real_clients_send(client):
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": "Answer in one short sentence."},
            {"role": "user", "content": [{"type": "text", "text": "Hello!"}], "name": "ann"},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": [{"type": "text", "text": "And of Italy?"}]},
        ],
        max_completion_tokens=16,
        temperature=0,
        presence_penalty=0,
        frequency_penalty=0,
        top_p=1,
        n=1,
        logprobs=False,
        parallel_tool_calls=True,
        stream=False,
        # accepted and ignored (README: "OpenAI API")
        store=False,
        metadata={"team": "docs"},
        service_tier="auto",
        reasoning_effort="low",
        user="ann",
        safety_identifier="ann",
        prompt_cache_key="k",
        verbosity="low",
        modalities=["text"],
    )
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason in ("stop", "length")


def test_a_typo_and_an_image_part_are_named(client):
    with pytest.raises(openai.UnprocessableEntityError, match="temprature"):
        client.chat.completions.create(
            model=MODEL, messages=ASK_WEATHER, extra_body={"temprature": 0.2}
        )
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    with pytest.raises(openai.BadRequestError, match="'image_url' part cannot be read"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [image]}])


# ---- sampling and choices ----


def test_n_choices_are_batched_together_and_reproducible_with_a_seed(client, server):
    before = httpx.get(f"{server.url}/health").json()["decoding"]
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a joke."}])
    first = client.chat.completions.create(**ask, n=3, seed=7, temperature=1.0, max_tokens=12)
    after = httpx.get(f"{server.url}/health").json()["decoding"]
    again = client.chat.completions.create(**ask, n=3, seed=7, temperature=1.0, max_tokens=12)
    texts = [choice.message.content for choice in first.choices]
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    assert texts == [choice.message.content for choice in again.choices]
    assert len(set(texts)) > 1  # independent choices, not one reply three times
    steps = after["steps"] - before["steps"]
    rows = after["rows_decoded"] - before["rows_decoded"]
    assert rows > steps  # several rows per decoding step: the choices shared the batch
    assert (
        first.usage.completion_tokens
        == sum(len(c.logprobs.content) if c.logprobs else 0 for c in first.choices)
        or first.usage.completion_tokens >= 3
    )


def test_penalties_bias_and_min_p_are_applied(client):
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Count from one to ten."}])
    plain = client.chat.completions.create(**ask, temperature=0, max_tokens=12, logprobs=True)
    first_token = plain.choices[0].logprobs.content[0]
    token_id = client_tokenize(client, first_token.token)
    banned = client.chat.completions.create(
        **ask, temperature=0, max_tokens=12, logit_bias={str(token_id): -100}, logprobs=True
    )
    assert banned.choices[0].logprobs.content[0].token != first_token.token
    penalised = client.chat.completions.create(
        **ask, temperature=0, max_tokens=30, frequency_penalty=2.0, presence_penalty=2.0
    )
    unpenalised = client.chat.completions.create(**ask, temperature=0, max_tokens=30)
    assert penalised.choices[0].message.content != unpenalised.choices[0].message.content
    sampled = client.chat.completions.create(
        **ask, temperature=1.0, seed=1, max_tokens=8, extra_body={"min_p": 0.99}
    )
    # min_p 0.99 keeps only (near-)argmax tokens: sampling becomes greedy
    greedy = client.chat.completions.create(**ask, temperature=0, max_tokens=8)
    assert sampled.choices[0].message.content == greedy.choices[0].message.content


def client_tokenize(client: OpenAI, text: str) -> int:
    root = str(client.base_url).removesuffix("/v1/").removesuffix("/v1")
    ids = httpx.post(f"{root}/tokenize", json={"prompt": text}).json()["tokens"]
    assert len(ids) == 1
    return ids[0]


# ---- log-probabilities ----


def test_logprobs_are_the_models_own_and_stream_the_same(client, server):
    ask = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a colour."}],
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=3,
        # without the default repetition penalty, greedy picks the model's own likeliest token
        extra_body={"repetition_penalty": 1.0},
    )
    plain = client.chat.completions.create(**ask)
    tokens = plain.choices[0].logprobs.content
    assert "".join(t.token for t in tokens) == plain.choices[0].message.content
    for token in tokens:
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0].logprob >= token.top_logprobs[-1].logprob
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob, abs=1e-5)  # greedy
        assert bytes(token.bytes).decode() == token.token
    streamed = [
        entry
        for chunk in client.chat.completions.create(**ask, stream=True)
        for choice in chunk.choices
        if choice.logprobs
        for entry in choice.logprobs.content
    ]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [
        (t.token, round(t.logprob, 4)) for t in tokens
    ]


def test_echo_scores_equal_the_models_log_softmax(client, server):
    """What evaluation harnesses do: score a text with max_tokens 0 and echo."""
    prompt = "The capital of France is Paris."
    completion = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2
    )
    choice = completion.choices[0]
    assert choice.text == prompt
    scores = choice.logprobs.token_logprobs
    assert scores[0] is None and all(s is not None and s <= 0 for s in scores[1:])
    assert choice.logprobs.top_logprobs[0] is None
    service = server.app.state.service
    ids = service.tokenize(prompt, add_special_tokens=False)
    assert "".join(choice.logprobs.tokens) == prompt and len(ids) == len(scores)
    with torch.inference_mode():
        logits = service.backend.engine.model(input_ids=torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits, dim=-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])
    assert torch.allclose(torch.tensor(scores[1:]), expected.squeeze(1), atol=1e-4)
    assert choice.logprobs.text_offset[:2] == [0, len(choice.logprobs.tokens[0])]


# ---- structured outputs ----


def leaf_schemas():
    return st.one_of(
        st.just({"type": "string", "maxLength": 12}),
        st.integers(-50, 50).map(
            lambda low: {"type": "integer", "minimum": low, "maximum": low + 99}
        ),
        st.just({"type": "number", "minimum": 0, "maximum": 10}),
        st.just({"type": "boolean"}),
        st.lists(
            st.sampled_from(["red", "green", "blue", "x y"]), min_size=1, max_size=3, unique=True
        ).map(lambda values: {"enum": values}),
    )


def object_schemas(children):
    names = st.sampled_from(["name", "age", "tags", "owner", "score", "ok", "kind"])
    return st.dictionaries(names, children, min_size=1, max_size=3).flatmap(
        lambda properties: st.lists(st.sampled_from(sorted(properties)), unique=True).map(
            lambda required: {
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": False,
            }
        )
    )


SCHEMAS = st.recursive(
    leaf_schemas(),
    lambda children: st.one_of(
        object_schemas(children),
        children.map(lambda items: {"type": "array", "items": items, "maxItems": 3}),
    ),
    max_leaves=6,
).map(
    lambda schema: (
        schema
        if schema.get("type") == "object"
        else {"type": "object", "properties": {"value": schema}, "required": ["value"]}
    )
)


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(schema=SCHEMAS, seed=st.integers(0, 1000), stream=st.booleans())
def test_every_constrained_reply_validates(client, schema, seed, stream):
    ask = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Make up an example record as JSON."}],
        temperature=1.0,
        seed=seed,
        max_tokens=400,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "record", "schema": schema, "strict": True},
        },
    )
    if stream:
        texts, reasons = stream_text(client.chat.completions.create(**ask, stream=True))
        text, reason = texts[0], reasons[0]
    else:
        choice = client.chat.completions.create(**ask).choices[0]
        text, reason = choice.message.content, choice.finish_reason
    assert reason == "stop", text
    jsonschema.validate(json.loads(text), schema)


def test_json_object_mode_and_an_unsupported_schema(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give me a JSON object with a cat's name and age."}],
        temperature=0,
        max_tokens=300,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError, match="not"):
        client.chat.completions.create(
            model=MODEL,
            messages=ASK_WEATHER,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}},
            },
        )


# ---- tools ----


def valid_call(call, tools) -> dict:
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in tools}
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in schemas
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, schemas[call.function.name])
    return arguments


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_and_named_tool_choice_force_valid_calls(client, temperature):
    tools = [WEATHER, TIME]
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=ASK_WEATHER,
            tools=tools,
            tool_choice=choice,
            temperature=temperature,
            seed=3,
            max_tokens=120,
            parallel_tool_calls=False,
        )
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "tool_calls"
        assert message.content is None and len(message.tool_calls) == 1
        valid_call(message.tool_calls[0], tools)
        if isinstance(choice, dict):
            assert message.tool_calls[0].function.name == "get_time"


def test_tool_choice_none_and_auto(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="none", max_tokens=16
    )
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content
    for seed in range(2):  # with auto, whichever the model picks is well formed
        reply = client.chat.completions.create(
            model=MODEL,
            messages=ASK_WEATHER,
            tools=[WEATHER, TIME],
            temperature=1.0,
            seed=seed,
            max_tokens=60,
        )
        message = reply.choices[0].message
        for call in message.tool_calls or []:
            valid_call(call, [WEATHER, TIME])
        assert message.tool_calls or message.content


def test_streamed_tool_calls_add_up_to_the_plain_ones(client):
    ask = dict(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=[WEATHER, TIME],
        tool_choice="required",
        temperature=0,
        max_tokens=120,
    )
    plain = client.chat.completions.create(**ask).choices[0]
    calls: dict[int, dict] = {}
    reason = None
    for chunk in client.chat.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            reason = choice.finish_reason or reason
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                if delta.id:
                    assert delta.function.name and delta.type == "function"
                    call["id"], call["name"] = delta.id, delta.function.name
                call["arguments"] += delta.function.arguments or ""
    expected = [(c.function.name, c.function.arguments) for c in plain.message.tool_calls]
    assert reason == plain.finish_reason
    streamed = [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]
    # A call cut short by max_tokens was announced in the stream, and is not in the result.
    assert streamed[: len(expected)] == expected


def test_a_full_tool_loop_with_two_tools_and_parallel_calls(client):
    tools = [WEATHER, TIME]
    messages = [{"role": "user", "content": "What is the weather in Paris and the time in Tokyo?"}]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=tools,
        tool_choice="required",
        temperature=0,
        max_tokens=150,
    )
    message = reply.choices[0].message
    for call in message.tool_calls:
        valid_call(call, tools)
    # The client runs each call and sends the results back; then the model answers.
    messages.append(message.model_dump(exclude_none=True))
    answers = {"get_weather": "Sunny, 22 C", "get_time": "09:30"}
    extra = {
        "id": "call_extra",
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"timezone": "Asia/Tokyo"}'},
    }
    messages[-1]["tool_calls"].append(extra)  # two calls in one turn, whatever the model did
    for call in messages[-1]["tool_calls"]:
        name = call["function"]["name"]
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": answers[name]})
    final = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=tools,
        tool_choice="none",
        temperature=0,
        max_tokens=30,
    )
    assert final.choices[0].message.content and final.choices[0].message.tool_calls is None


# ---- legacy completions and the tokenizer routes ----


def test_completions_take_every_prompt_shape(client):
    ids = client_ids(client, "One, two, three,")
    for prompt, count in (
        ("One, two, three,", 1),
        (["One, two, three,", "A, B, C,"], 2),
        (ids, 1),
        ([ids, ids], 2),
    ):
        completion = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=4, temperature=0, n=1
        )
        assert [choice.index for choice in completion.choices] == list(range(count))
        assert all(choice.text for choice in completion.choices)
    by_text = client.completions.create(
        model=MODEL, prompt="One, two, three,", max_tokens=4, temperature=0
    )
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text
    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(
            model=MODEL, prompt="One, two, three,", max_tokens=4, temperature=0, stream=True
        )
        if chunk.choices
    )
    assert streamed == by_text.choices[0].text
    stopped = client.completions.create(
        model=MODEL, prompt="One, two, three,", max_tokens=8, temperature=0, stop=[","], n=2
    )
    assert len(stopped.choices) == 2 and all("," not in c.text for c in stopped.choices)


def client_ids(client: OpenAI, text: str) -> list[int]:
    root = str(client.base_url).removesuffix("/v1/").removesuffix("/v1")
    return httpx.post(f"{root}/tokenize", json={"prompt": text}).json()["tokens"]


def test_tokenize_and_detokenize_round_trip(server):
    text = "Héllo wörld, tokens!"
    tokenized = httpx.post(f"{server.url}/tokenize", json={"prompt": text}).json()
    assert tokenized["count"] == len(tokenized["tokens"]) and tokenized["max_model_len"] > 0
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": tokenized["tokens"]}).json()
    assert back["prompt"] == text
    chat = httpx.post(
        f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}
    ).json()
    assert chat["count"] > tokenized["count"] // 4  # the template's tokens around "hi"
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and "not in the vocabulary" in bad.json()["error"]["message"]
