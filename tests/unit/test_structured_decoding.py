"""Grammars, tools and log-probabilities in the one decode loop, on a tiny random Llama with
SmolLM2's real tokenizer: whatever the (random) model prefers, a constrained row always ends
as text its grammar accepts, constrained and free rows share a batch without changing each
other, and reported log-probabilities are the model's own."""

import json

import jsonschema
import llguidance
import pytest
import torch

from src.chat.structured import json_schema_grammar
from src.chat.tools import Tool, ToolCallStream, ToolSet, tool_grammar
from src.errors import InvalidRequestError
from src.params import GenerationParams

pytestmark = pytest.mark.unit

GREEDY = GenerationParams(do_sample=False, max_new_tokens=60, repetition_penalty=1.0)
SAMPLED = GenerationParams(temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=60, seed=0)
# Every value is bounded, so even a random model must finish within max_new_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["colour", "count", "ok"],
    "additionalProperties": False,
}
JSON_REPLY = {"type": "json_schema", "json_schema": SCHEMA}
LIGHTS = Tool(
    "set_lights",
    "Switch the lights",
    {
        "type": "object",
        "properties": {"on": {"type": "boolean"}},
        "required": ["on"],
        "additionalProperties": False,  # else a random model may add keys without end
    },
)
TIMER = Tool(
    "set_timer",
    "Start a timer",
    {
        "type": "object",
        "properties": {"minutes": {"type": "integer", "minimum": 1, "maximum": 60}},
        "required": ["minutes"],
        "additionalProperties": False,
    },
)


def reply(service, params, message="hello", tools=None):
    conversation = service.new_conversation()
    return service.start_reply(conversation, message, params, tools=tools).complete()


@pytest.mark.parametrize("seed", range(4))
def test_a_constrained_reply_always_validates_even_from_a_random_model(tiny_llama_service, seed):
    params = SAMPLED.updated(seed=seed, response_format=JSON_REPLY)
    result = reply(tiny_llama_service, params)
    assert result.finish_reason == "stop", result.text
    jsonschema.validate(json.loads(result.text), SCHEMA)


def test_constrained_and_free_rows_share_a_batch(tiny_llama_service):
    service = tiny_llama_service
    free_alone = reply(service, GREEDY).text
    constrained_alone = reply(service, GREEDY.updated(response_format=JSON_REPLY)).text
    service.cache.clear()  # the greedy replies above would be answered from the cache
    stats = service.backend.engine.stats
    steps, rows = stats.steps, stats.rows_decoded
    with service.backend.together():  # queued together: one batch
        free = service.start_reply(service.new_conversation(), "hello", GREEDY)
        constrained = service.start_reply(
            service.new_conversation(), "hello", GREEDY.updated(response_format=JSON_REPLY)
        )
    results = [s.complete() for s in (free, constrained)]  # (the engine runs both rows)
    assert [r.text for r in results] == [free_alone, constrained_alone]
    assert stats.rows_decoded - rows > stats.steps - steps  # two rows in some steps


def test_a_schema_the_library_cannot_enforce_is_refused_by_name(tiny_llama_service):
    bad = {"type": "json_schema", "json_schema": {"type": "object", "not": {"required": ["a"]}}}
    with pytest.raises(InvalidRequestError, match="not") as error:
        reply(tiny_llama_service, GREEDY.updated(response_format=bad))
    assert error.value.field == "response_format"


def test_logprobs_are_the_log_softmax_of_the_models_logits(tiny_llama_service):
    service = tiny_llama_service
    params = GREEDY.updated(max_new_tokens=6, logprobs=True, top_logprobs=3)
    stream = service.start_reply(service.new_conversation(), "hello", params)
    result = stream.complete()
    engine = service.backend.engine
    ids = list(stream.prompt.input_ids)
    generated = [
        service.backend.tokenizer.encode(t.token, add_special_tokens=False) for t in result.logprobs
    ]
    with torch.inference_mode():
        for token in result.logprobs:
            logits = engine.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            expected = torch.log_softmax(logits, dim=-1)
            token_id = int(expected.argmax())  # greedy, no penalty: the argmax
            assert token.logprob == pytest.approx(float(expected[token_id]), abs=1e-5)
            best = torch.topk(expected, 3)
            assert [lp for _, _, lp in token.top] == pytest.approx(best.values.tolist(), abs=1e-5)
            ids.append(token_id)
    assert len(result.logprobs) == len(generated)


def test_the_prompt_is_scored_with_max_new_tokens_zero(tiny_llama_service):
    service = tiny_llama_service
    params = GREEDY.updated(max_new_tokens=0, logprobs=True, prompt_logprobs=True)
    prompt = "The cat sat on the mat"
    result = service.start_completions([prompt], params)[0].complete()
    ids = service.tokenize(prompt, add_special_tokens=False)
    assert result.text == "" and result.completion_tokens == 0
    scores = [token.logprob for token in result.prompt_logprobs]
    assert scores[0] is None and len(scores) == len(ids)
    with torch.inference_mode():
        logits = service.backend.engine.model(input_ids=torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])
    assert scores[1:] == pytest.approx(expected.squeeze(1).tolist(), abs=1e-5)


@pytest.fixture(scope="module")
def roomy_llama_service(tiny_llama_path):
    """The tiny Llama with room for the tools' system prompt (RoPE has no hard limit)."""
    from tests.conftest import make_service

    service = make_service(tiny_llama_path, context_window=512)
    yield service
    service.close()


@pytest.mark.parametrize("choice", ["required", "function"])
def test_forced_tool_calls_name_a_tool_with_valid_arguments(roomy_llama_service, choice):
    function = "set_timer" if choice == "function" else None
    tools = ToolSet((LIGHTS, TIMER), choice, function, parallel=False)
    for seed in range(3):
        params = SAMPLED.updated(seed=seed, max_new_tokens=250)
        result = reply(roomy_llama_service, params, "lights", tools)
        # A random model spells the forced text in odd pieces, but it always gets there.
        assert result.finish_reason == "tool_calls", result
        assert len(result.tool_calls) == 1 and result.text == ""
        for call in result.tool_calls:
            schema = {t.name: t.parameters for t in tools.tools}[call.name]
            jsonschema.validate(json.loads(call.arguments), schema)
            assert choice != "function" or call.name == "set_timer"


def test_the_tool_grammar_accepts_calls_and_refuses_anything_else(tiny_llama_service):
    backend = tiny_llama_service.backend
    tokenizer = backend.tokenizer
    call = '<tool_call>\n{"name": "set_timer", "arguments": {"minutes": 5}}\n</tool_call>'
    cases = {
        "auto": {"Sure.": True, f"On it. {call}": True, call.replace("5", "500"): False},
        "required": {"Sure.": False, call: True, f"{call}\n{call}": True},
    }
    for choice, texts in cases.items():
        grammar = tool_grammar(ToolSet((LIGHTS, TIMER), choice))
        for text, accepted in texts.items():
            matcher = llguidance.LLMatcher(backend.grammars.llg_tokenizer, grammar, log_level=0)
            ids = tokenizer.encode(text, add_special_tokens=False)
            ok = matcher.consume_tokens(ids) and matcher.is_accepting()
            assert ok is accepted, (choice, text)
    single = tool_grammar(ToolSet((LIGHTS, TIMER), "required", parallel=False))
    matcher = llguidance.LLMatcher(backend.grammars.llg_tokenizer, single, log_level=0)
    assert not matcher.consume_tokens(tokenizer.encode(f"{call}\n{call}", add_special_tokens=False))
    assert json_schema_grammar({"type": "object"})


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_tool_calls_are_read_from_text_in_pieces_of_any_size(size):
    text = (
        'Let me check. <tool_call>\n{"name": "set_timer", "arguments": {"minutes": 5}}\n'
        '</tool_call>\n<tool_call>\n{"name": "set_lights", "arguments": {"on": true}}\n</tool_call>'
    )
    stream = ToolCallStream()
    content, arguments, names = "", {}, {}
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    for part in [stream.push(piece) for piece in pieces] + [stream.flush()]:
        content += part[0]
        for delta in part[1]:
            if delta.name:
                names[delta.index] = delta.name
            arguments[delta.index] = arguments.get(delta.index, "") + delta.arguments
    assert content == "Let me check. "
    assert names == {0: "set_timer", 1: "set_lights"}
    assert arguments == {0: '{"minutes": 5}', 1: '{"on": true}'}
    assert [(c.name, c.arguments) for c in stream.calls] == [
        ("set_timer", '{"minutes": 5}'),
        ("set_lights", '{"on": true}'),
    ]


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_a_closing_tag_inside_the_arguments_does_not_end_the_call(size):
    """The grammar lets a JSON string hold any text, the closing tag too (a 16-client soak
    once got a 500 from a reply cut there): the call ends after its whole JSON object."""
    arguments = '{"note": "a </tool_call> b", "on": true}'
    text = f'<tool_call>\n{{"name": "set_lights", "arguments": {arguments}}}\n</tool_call>'
    stream = ToolCallStream()
    streamed = ""
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    for content, deltas in [stream.push(piece) for piece in pieces] + [stream.flush()]:
        assert content == ""
        streamed += "".join(delta.arguments for delta in deltas)
    assert [(c.name, c.arguments) for c in stream.calls] == [("set_lights", arguments)]
    assert streamed == arguments


def test_text_that_only_looks_like_a_tag_is_content():
    stream = ToolCallStream()
    content = stream.push("a <tool")[0] + stream.push("box> b")[0] + stream.flush()[0]
    assert content == "a <toolbox> b" and stream.calls == []


def test_a_tool_set_names_what_is_wrong():
    with pytest.raises(InvalidRequestError, match="'required' needs tools"):
        ToolSet((), "required")
    with pytest.raises(InvalidRequestError, match="no tool named 'nope'"):
        ToolSet((LIGHTS,), "function", "nope")
    with pytest.raises(InvalidRequestError, match="same name"):
        ToolSet((LIGHTS, LIGHTS))


def test_schemas_and_tools_are_bounded():
    from src.params import MAX_SCHEMA_CHARS, make_params

    huge = {"type": "object", "description": "x" * MAX_SCHEMA_CHARS}
    with pytest.raises(InvalidRequestError, match="over the limit of 32000") as error:
        make_params({"response_format": {"type": "json_schema", "json_schema": huge}})
    assert error.value.field.startswith("response_format")
    with pytest.raises(InvalidRequestError, match="129 tools is over the limit of 128"):
        ToolSet(tuple(Tool(f"t{i}") for i in range(129)))
    with pytest.raises(InvalidRequestError, match="over the limit of 64000"):
        ToolSet((Tool("big", "d" * 64_000),))
